// The list checks (csrc/common/tensor_lists.cpp) built into the CUDA library too. A
// wrapper file rather than the shared path itself: both extensions would otherwise
// write one object file, with different flags, and rebuild it on every build.
#include "../common/tensor_lists.cpp"
