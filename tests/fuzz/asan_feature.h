/* asan_feature.h: force-included into fuzz_cuda's C++ sources (the emulator
   and the .cu files). tests/emu switches its fibers with AddressSanitizer's
   annotations under __SANITIZE_ADDRESS__, which GCC defines with
   -fsanitize=address and clang 14 does not (newer clangs may: then this
   does nothing); without the annotations ASan loses track of the fiber
   stacks. */
#if defined(__has_feature)
#if __has_feature(address_sanitizer) && !defined(__SANITIZE_ADDRESS__)
#define __SANITIZE_ADDRESS__ 1
#endif
#endif
