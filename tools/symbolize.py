"""Symbolize glibc backtrace lines (`lib(+0xoff)[addr]` or `lib(sym+0xoff)[addr]`) read
from stdin with addr2line, for tools/segv_backtrace.c output; other lines pass through."""
import re
import subprocess
import sys

LINE = re.compile(r"^(?P<lib>[^(\s]+)\((?P<sym>[^+)]*)\+(?P<off>0x[0-9a-f]+)\)\[(?P<addr>0x[0-9a-f]+)\]")
for line in sys.stdin:
    m = LINE.match(line.strip())
    if not m or m["sym"]:
        sys.stdout.write(line)
        continue
    try:
        out = subprocess.run(["addr2line", "-f", "-C", "-i", "-e", m["lib"], m["off"]],
                             capture_output=True, text=True, timeout=20).stdout.split("\n")
        where = " <- ".join(f"{fn} ({loc.rsplit('/', 1)[-1]})"
                            for fn, loc in zip(out[0::2], out[1::2]) if fn)
    except (OSError, subprocess.SubprocessError) as exc:
        where = f"addr2line failed: {exc}"
    sys.stdout.write(f"{m['lib'].rsplit('/', 1)[-1]}+{m['off']}: {where}\n")
