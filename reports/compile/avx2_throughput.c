/* Throughput of the AVX2 instructions our int8 kernels use, on this core (one thread, 8 independent chains each):
 *   gcc -O2 -mavx2 -mfma reports/compile/avx2_throughput.c -o /tmp/avx2_throughput && /tmp/avx2_throughput
 * prints G instructions per second for vpmaddwd (+ vpaddd), vfmadd231ps and vpmaddubsw; divide by the clock
 * for instructions per cycle. */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(){
  __m256i a=_mm256_set1_epi16(3), b=_mm256_set1_epi16(5);
  __m256i c0=_mm256_setzero_si256(),c1=c0,c2=c0,c3=c0,c4=c0,c5=c0,c6=c0,c7=c0;
  long N=200000000;
  double t=now();
  for(long i=0;i<N;i++){
    __asm__ volatile("" : "+x"(a));
    c0=_mm256_add_epi32(c0,_mm256_madd_epi16(a,b));
    c1=_mm256_add_epi32(c1,_mm256_madd_epi16(a,c1));
    c2=_mm256_add_epi32(c2,_mm256_madd_epi16(a,c2));
    c3=_mm256_add_epi32(c3,_mm256_madd_epi16(a,c3));
    c4=_mm256_add_epi32(c4,_mm256_madd_epi16(b,c4));
    c5=_mm256_add_epi32(c5,_mm256_madd_epi16(b,c5));
    c6=_mm256_add_epi32(c6,_mm256_madd_epi16(b,c6));
    c7=_mm256_add_epi32(c7,_mm256_madd_epi16(b,c7));
  }
  double dt=now()-t;
  __m256i s=_mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(c0,c1),_mm256_add_epi32(c2,c3)),_mm256_add_epi32(_mm256_add_epi32(c4,c5),_mm256_add_epi32(c6,c7)));
  printf("vpmaddwd: %.3f ns per 8 (%.2f G/s) %d\n", dt/N*1e9, 8.0*N/dt/1e9, _mm256_extract_epi32(s,0));
  // fp32 fma
  __m256 x=_mm256_set1_ps(1.0001f),y=_mm256_set1_ps(0.999f);
  __m256 f0=_mm256_setzero_ps(),f1=f0,f2=f0,f3=f0,f4=f0,f5=f0,f6=f0,f7=f0;
  t=now();
  for(long i=0;i<N;i++){
    __asm__ volatile("" : "+x"(x));
    f0=_mm256_fmadd_ps(x,y,f0);f1=_mm256_fmadd_ps(x,y,f1);f2=_mm256_fmadd_ps(x,y,f2);f3=_mm256_fmadd_ps(x,y,f3);
    f4=_mm256_fmadd_ps(x,y,f4);f5=_mm256_fmadd_ps(x,y,f5);f6=_mm256_fmadd_ps(x,y,f6);f7=_mm256_fmadd_ps(x,y,f7);
  }
  dt=now()-t;
  __m256 fs=_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(f0,f1),_mm256_add_ps(f2,f3)),_mm256_add_ps(_mm256_add_ps(f4,f5),_mm256_add_ps(f6,f7)));
  printf("fma: %.3f ns per 8 (%.2f G/s) %f\n", dt/N*1e9, 8.0*N/dt/1e9, _mm256_cvtss_f32(fs));
  // vpmaddubsw
  __m256i u=_mm256_set1_epi8(3), v=_mm256_set1_epi8(5);
  c0=_mm256_setzero_si256();c1=c0;c2=c0;c3=c0;c4=c0;c5=c0;c6=c0;c7=c0;
  t=now();
  for(long i=0;i<N;i++){
    __asm__ volatile("" : "+x"(u));
    c0=_mm256_maddubs_epi16(u,c0);c1=_mm256_maddubs_epi16(u,c1);c2=_mm256_maddubs_epi16(u,c2);c3=_mm256_maddubs_epi16(u,c3);
    c4=_mm256_maddubs_epi16(u,c4);c5=_mm256_maddubs_epi16(u,c5);c6=_mm256_maddubs_epi16(u,c6);c7=_mm256_maddubs_epi16(u,c7);
  }
  dt=now()-t;
  s=_mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(c0,c1),_mm256_add_epi32(c2,c3)),_mm256_add_epi32(_mm256_add_epi32(c4,c5),_mm256_add_epi32(c6,c7)));
  printf("vpmaddubsw: %.3f ns per 8 (%.2f G/s) %d\n", dt/N*1e9, 8.0*N/dt/1e9, _mm256_extract_epi32(s,0));
}
