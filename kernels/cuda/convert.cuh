// Shared by the NVRTC-compiled kernels (prepended to each source after its #defines): needs HALF_T.

#ifdef __CUDA_ARCH__  // (a CPU test of a kernel defines its own)
// v rounded to the weight's dtype (HALF_T: fp16, else bf16), as 16 bits.
__device__ __forceinline__ unsigned short from_float(float v) {
    unsigned short h;
#if HALF_T
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
#else
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
#endif
    return h;
}
#endif
