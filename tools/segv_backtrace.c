/* LD_PRELOAD helper for a GPU lease without gdb: on SIGSEGV print the native stack
 * (glibc backtrace_symbols_fd: library(symbol+offset)) to stderr, then exit 139.
 *   gcc -shared -fPIC -O1 -o /tmp/segv.so tools/segv_backtrace.c
 *   LD_PRELOAD=/tmp/segv.so python3 tools/repro_malformed.py cuda */
#include <execinfo.h>
#include <signal.h>
#include <unistd.h>

static void on_segv(int sig) {
  void* frames[64];
  int n = backtrace(frames, 64);
  backtrace_symbols_fd(frames, n, 2);
  _exit(128 + sig);
}

__attribute__((constructor)) static void install(void) { signal(SIGSEGV, on_segv); }
