/*
 * sandbox-probe.c — does the CUDA driver (and cuBLAS) work under the seccomp
 * rules of mkad.service?  Built and run by sandbox-probe.sh, which generates
 * sandbox-allowed.h from the unit's SystemCallFilter= lines.  With --filter
 * it installs a seccomp filter that traps (SIGSYS: logged, then the call
 * returns -EPERM) on:
 *   - MemoryDenyWriteExecute=yes: mmap W+X, mprotect/pkey_mprotect adding X,
 *     shmat with SHM_EXEC (what systemd's own filter refuses);
 *   - SystemCallFilter=: any system call outside the unit's allow list;
 *   - RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX: socket() of another family;
 * and logs every openat/mkdirat (performed for real) to show which files the
 * driver touches.  Then it runs cuInit, a context, device and pinned
 * allocations, a PTX kernel through the driver's JIT and, given a cuBLAS
 * library, an SGEMM, checking the results.  x86_64 Linux only.
 *
 * usage: sandbox-probe [--filter] [--cublas /path/libcublas.so.N] [--selftest]
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/shm.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#include "sandbox-allowed.h"

#define MAXREC 512
#define STACKW 96
#define MAGIC 0x6d6b6164u
#define MAXOPEN 1024
typedef struct orec { int nr, flags; long ret; char path[160]; } orec;
static orec opens[MAXOPEN];
static atomic_int n_open;

typedef struct rec {
    int nr;
    unsigned long a0, a2;
    void *ip;
    uintptr_t stack[STACKW];
} rec;
static rec recs[MAXREC];
static atomic_int n_rec;
static atomic_int n_total;

static void on_sigsys(int sig, siginfo_t *si, void *ctx)
{
    (void)sig;
    ucontext_t *uc = ctx;
    greg_t *g = uc->uc_mcontext.gregs;
    if (si->si_syscall == __NR_openat || si->si_syscall == __NR_mkdirat) {
        /* logged, then done for real: re-issued with the magic that the filter lets through */
        int saved = errno;
        long ret = si->si_syscall == __NR_openat
                       ? syscall(__NR_openat, g[REG_RDI], g[REG_RSI], g[REG_RDX], g[REG_R10], (long)MAGIC)
                       : syscall(__NR_mkdirat, g[REG_RDI], g[REG_RSI], g[REG_RDX], (long)MAGIC);
        if (ret < 0) ret = -errno;
        errno = saved;
        int i = atomic_fetch_add(&n_open, 1);
        if (i < MAXOPEN) {
            orec *o = &opens[i];
            o->nr = si->si_syscall;
            o->flags = (int)g[REG_RDX];
            o->ret = ret;
            const char *pth = (const char *)g[REG_RSI];
            size_t k = 0;
            for (; pth && pth[k] && k < sizeof o->path - 1; k++) o->path[k] = pth[k];
            o->path[k] = 0;
        }
        g[REG_RAX] = ret;
        return;
    }
    atomic_fetch_add(&n_total, 1);
    int i = atomic_fetch_add(&n_rec, 1);
    if (i < MAXREC) {
        rec *r = &recs[i];
        r->nr = si->si_syscall;
        r->a0 = (unsigned long)uc->uc_mcontext.gregs[REG_RDI];
        r->a2 = (unsigned long)uc->uc_mcontext.gregs[REG_RDX];
        r->ip = si->si_call_addr;
        uintptr_t *sp = (uintptr_t *)uc->uc_mcontext.gregs[REG_RSP];
        for (int k = 0; k < STACKW; k++) r->stack[k] = sp[k];
    }
    uc->uc_mcontext.gregs[REG_RAX] = -EPERM;
}

static struct sock_filter prog[4096];
static int np;
static void emit(struct sock_filter f) { prog[np++] = f; }
#define STMT(c, k) emit((struct sock_filter)BPF_STMT(c, k))
#define JUMP(c, k, t, f) emit((struct sock_filter)BPF_JUMP(c, k, t, f))
#define ARG_LO(i) (offsetof(struct seccomp_data, args) + 8 * (i))

static int install_filter(void)
{
    const unsigned ALLOW = SECCOMP_RET_ALLOW, TRAP = SECCOMP_RET_TRAP;
    STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch));
    JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0);
    STMT(BPF_RET | BPF_K, TRAP);
    STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
    /* special cases: jump to their check blocks (fixed up below) */
    int special[] = { __NR_mmap, __NR_mprotect, __NR_pkey_mprotect, __NR_shmat, __NR_socket, __NR_openat,
                      __NR_mkdirat };
    int ja_at[7];
    for (int s = 0; s < 7; s++) {
        JUMP(BPF_JMP | BPF_JEQ | BPF_K, special[s], 0, 1);
        ja_at[s] = np;
        STMT(BPF_JMP | BPF_JA, 0);
    }
    for (size_t i = 0; i < sizeof allowed_nr / sizeof *allowed_nr; i++) {
        JUMP(BPF_JMP | BPF_JEQ | BPF_K, allowed_nr[i], 0, 1);
        STMT(BPF_RET | BPF_K, ALLOW);
    }
    STMT(BPF_RET | BPF_K, TRAP);
    /* mmap: W+X */
    prog[ja_at[0]].k = np - ja_at[0] - 1;
    STMT(BPF_LD | BPF_W | BPF_ABS, ARG_LO(2));
    STMT(BPF_ALU | BPF_AND | BPF_K, PROT_WRITE | PROT_EXEC);
    JUMP(BPF_JMP | BPF_JEQ | BPF_K, PROT_WRITE | PROT_EXEC, 0, 1);
    STMT(BPF_RET | BPF_K, TRAP);
    STMT(BPF_RET | BPF_K, ALLOW);
    /* mprotect, pkey_mprotect: +X */
    prog[ja_at[1]].k = np - ja_at[1] - 1;
    prog[ja_at[2]].k = np - ja_at[2] - 1;
    STMT(BPF_LD | BPF_W | BPF_ABS, ARG_LO(2));
    STMT(BPF_ALU | BPF_AND | BPF_K, PROT_EXEC);
    JUMP(BPF_JMP | BPF_JEQ | BPF_K, PROT_EXEC, 0, 1);
    STMT(BPF_RET | BPF_K, TRAP);
    STMT(BPF_RET | BPF_K, ALLOW);
    /* shmat: SHM_EXEC */
    prog[ja_at[3]].k = np - ja_at[3] - 1;
    STMT(BPF_LD | BPF_W | BPF_ABS, ARG_LO(2));
    STMT(BPF_ALU | BPF_AND | BPF_K, SHM_EXEC);
    JUMP(BPF_JMP | BPF_JEQ | BPF_K, SHM_EXEC, 0, 1);
    STMT(BPF_RET | BPF_K, TRAP);
    STMT(BPF_RET | BPF_K, ALLOW);
    /* socket: AF_UNIX, AF_INET, AF_INET6 */
    prog[ja_at[4]].k = np - ja_at[4] - 1;
    STMT(BPF_LD | BPF_W | BPF_ABS, ARG_LO(0));
    JUMP(BPF_JMP | BPF_JEQ | BPF_K, 1, 2, 0);
    JUMP(BPF_JMP | BPF_JEQ | BPF_K, 2, 1, 0);
    JUMP(BPF_JMP | BPF_JEQ | BPF_K, 10, 0, 1);
    STMT(BPF_RET | BPF_K, ALLOW);
    STMT(BPF_RET | BPF_K, TRAP);
    /* openat (arg 4) and mkdirat (arg 3): trap (to log) unless re-issued with the magic */
    prog[ja_at[5]].k = np - ja_at[5] - 1;
    STMT(BPF_LD | BPF_W | BPF_ABS, ARG_LO(4));
    JUMP(BPF_JMP | BPF_JEQ | BPF_K, MAGIC, 0, 1);
    STMT(BPF_RET | BPF_K, ALLOW);
    STMT(BPF_RET | BPF_K, TRAP);
    prog[ja_at[6]].k = np - ja_at[6] - 1;
    STMT(BPF_LD | BPF_W | BPF_ABS, ARG_LO(3));
    JUMP(BPF_JMP | BPF_JEQ | BPF_K, MAGIC, 0, 1);
    STMT(BPF_RET | BPF_K, ALLOW);
    STMT(BPF_RET | BPF_K, TRAP);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigsys;
    sa.sa_flags = SA_SIGINFO;
    if (sigaction(SIGSYS, &sa, NULL) != 0) return -1;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) { perror("no_new_privs"); return -1; }
    struct sock_fprog fp = { (unsigned short)np, prog };
    /* TSYNC: every thread, including ones the driver starts later (they inherit) */
    if (syscall(__NR_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &fp) != 0) {
        perror("seccomp");
        return -1;
    }
    fprintf(stderr, "filter installed: %d instructions\n", np);
    return 0;
}

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
#define SYM(lib, name) void *name##_p = dlsym(lib, #name); if (!name##_p) { fprintf(stderr, "no symbol %s\n", #name); return 1; }

static const char ptx[] =
    ".version 7.0\n.target sm_50\n.address_size 64\n"
    ".visible .entry inc(.param .u64 p, .param .u32 n)\n{\n"
    ".reg .u32 %r<5>;\n.reg .u64 %rd<4>;\n.reg .pred %p;\n.reg .f32 %f<2>;\n"
    "ld.param.u64 %rd1, [p];\nld.param.u32 %r1, [n];\n"
    "mov.u32 %r2, %tid.x;\nmov.u32 %r3, %ctaid.x;\nmov.u32 %r4, %ntid.x;\n"
    "mad.lo.u32 %r2, %r3, %r4, %r2;\nsetp.ge.u32 %p, %r2, %r1;\n@%p bra DONE;\n"
    "cvta.to.global.u64 %rd1, %rd1;\nmul.wide.u32 %rd2, %r2, 4;\nadd.u64 %rd3, %rd1, %rd2;\n"
    "ld.global.f32 %f1, [%rd3];\nadd.f32 %f1, %f1, 0f3F800000;\nst.global.f32 [%rd3], %f1;\n"
    "DONE:\nret;\n}\n";

static void *cu;
static const char *errstr(CUresult r)
{
    const char *s = NULL;
    CUresult (*f)(CUresult, const char **) = dlsym(cu, "cuGetErrorString");
    if (f) f(r, &s);
    return s ? s : "?";
}
#define CK(call) do { CUresult r_ = (call); if (r_) { fprintf(stderr, "FAIL %s -> %d %s\n", #call, r_, errstr(r_)); fails++; goto report; } else fprintf(stderr, "ok   %s\n", #call); } while (0)

int main(int argc, char **argv)
{
    int filter = 0, fails = 0;
    const char *cublas_path = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--filter")) filter = 1;
        else if (!strcmp(argv[i], "--cublas") && i + 1 < argc) cublas_path = argv[++i];
    }
    if (filter && install_filter() != 0) return 2;
    if (argc > 1 && !strcmp(argv[argc - 1], "--selftest")) {
        void *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        fprintf(stderr, "selftest mmap wx: %s\n", m == MAP_FAILED ? strerror(errno) : "mapped");
        m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        fprintf(stderr, "selftest mmap rw: %s\n", m == MAP_FAILED ? strerror(errno) : "mapped");
        fprintf(stderr, "selftest mprotect rx: %d\n", mprotect(m, 4096, PROT_READ | PROT_EXEC));
        fprintf(stderr, "selftest socket netlink: %d inet: %d\n", (int)syscall(__NR_socket, 16, 3, 0),
                (int)syscall(__NR_socket, 2, 1, 0));
        fprintf(stderr, "selftest sched_setaffinity: %d\n", (int)syscall(__NR_sched_setaffinity, 0, 0, NULL));
    }
    cu = dlopen("libcuda.so.1", RTLD_NOW);
    if (!cu) { fprintf(stderr, "FAIL dlopen libcuda: %s\n", dlerror()); fails++; goto report; }
    {
        CUresult (*cuInit)(unsigned) = dlsym(cu, "cuInit");
        CUresult (*cuDeviceGetCount)(int *) = dlsym(cu, "cuDeviceGetCount");
        CUresult (*cuDeviceGet)(int *, int) = dlsym(cu, "cuDeviceGet");
        CUresult (*cuDeviceGetName)(char *, int, int) = dlsym(cu, "cuDeviceGetName");
        CUresult (*cuCtxCreate)(void **, unsigned, int) = dlsym(cu, "cuCtxCreate_v2");
        CUresult (*cuMemGetInfo)(size_t *, size_t *) = dlsym(cu, "cuMemGetInfo_v2");
        CUresult (*cuMemAlloc)(CUdeviceptr *, size_t) = dlsym(cu, "cuMemAlloc_v2");
        CUresult (*cuMemcpyHtoD)(CUdeviceptr, const void *, size_t) = dlsym(cu, "cuMemcpyHtoD_v2");
        CUresult (*cuMemcpyDtoH)(void *, CUdeviceptr, size_t) = dlsym(cu, "cuMemcpyDtoH_v2");
        CUresult (*cuMemAllocHost)(void **, size_t) = dlsym(cu, "cuMemAllocHost_v2");
        CUresult (*cuModuleLoadData)(void **, const void *) = dlsym(cu, "cuModuleLoadData");
        CUresult (*cuModuleGetFunction)(void **, void *, const char *) = dlsym(cu, "cuModuleGetFunction");
        CUresult (*cuLaunchKernel)(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                                   unsigned, void *, void **, void **) = dlsym(cu, "cuLaunchKernel");
        CUresult (*cuCtxSynchronize)(void) = dlsym(cu, "cuCtxSynchronize");
        int n = 0, dev = 0;
        char name[128] = "";
        CK(cuInit(0));
        CK(cuDeviceGetCount(&n));
        CK(cuDeviceGet(&dev, 0));
        CK(cuDeviceGetName(name, sizeof name, dev));
        fprintf(stderr, "     devices=%d name=%s\n", n, name);
        void *ctx;
        CK(cuCtxCreate(&ctx, 0, dev));
        size_t fr = 0, tot = 0;
        CK(cuMemGetInfo(&fr, &tot));
        fprintf(stderr, "     free=%zu MiB total=%zu MiB\n", fr >> 20, tot >> 20);
        size_t N = 1 << 24;
        CUdeviceptr d;
        CK(cuMemAlloc(&d, N * 4));
        float *h;
        CK(cuMemAllocHost((void **)&h, N * 4));
        for (size_t i = 0; i < N; i++) h[i] = (float)(i % 1000);
        CK(cuMemcpyHtoD(d, h, N * 4));
        void *mod, *fn;
        CK(cuModuleLoadData(&mod, ptx));
        CK(cuModuleGetFunction(&fn, mod, "inc"));
        unsigned nn = (unsigned)N;
        void *params[] = { &d, &nn };
        CK(cuLaunchKernel(fn, (unsigned)(N / 256), 1, 1, 256, 1, 1, 0, NULL, params, NULL));
        CK(cuCtxSynchronize());
        CK(cuMemcpyDtoH(h, d, N * 4));
        size_t bad = 0;
        for (size_t i = 0; i < N; i++) bad += h[i] != (float)(i % 1000) + 1.0f;
        fprintf(stderr, "%s kernel result: %zu wrong of %zu\n", bad ? "FAIL" : "ok  ", bad, N);
        fails += bad != 0;
        if (cublas_path) {
            void *cb = dlopen(cublas_path, RTLD_NOW);
            if (!cb) { fprintf(stderr, "FAIL dlopen %s: %s\n", cublas_path, dlerror()); fails++; goto report; }
            int (*create)(void **) = dlsym(cb, "cublasCreate_v2");
            int (*sgemm)(void *, int, int, int, int, int, const float *, const float *, int, const float *,
                         int, const float *, float *, int) = dlsym(cb, "cublasSgemm_v2");
            int (*destroy)(void *) = dlsym(cb, "cublasDestroy_v2");
            void *hd = NULL;
            int st = create(&hd);
            fprintf(stderr, "%s cublasCreate -> %d\n", st ? "FAIL" : "ok  ", st);
            if (st) { fails++; goto report; }
            int M = 1024;
            CUdeviceptr A, B, C;
            CK(cuMemAlloc(&A, (size_t)M * M * 4));
            CK(cuMemAlloc(&B, (size_t)M * M * 4));
            CK(cuMemAlloc(&C, (size_t)M * M * 4));
            for (int i = 0; i < M * M; i++) h[i] = 1.0f;
            CK(cuMemcpyHtoD(A, h, (size_t)M * M * 4));
            CK(cuMemcpyHtoD(B, h, (size_t)M * M * 4));
            float one = 1, zero = 0;
            st = sgemm(hd, 0, 0, M, M, M, &one, (float *)A, M, (float *)B, M, &zero, (float *)C, M);
            fprintf(stderr, "%s cublasSgemm -> %d\n", st ? "FAIL" : "ok  ", st);
            fails += st != 0;
            CK(cuCtxSynchronize());
            CK(cuMemcpyDtoH(h, C, (size_t)M * M * 4));
            bad = 0;
            for (int i = 0; i < M * M; i++) bad += h[i] != (float)M;
            fprintf(stderr, "%s sgemm result: %zu wrong\n", bad ? "FAIL" : "ok  ", bad);
            fails += bad != 0;
            destroy(hd);
        }
    }
report:;
    int n = atomic_load(&n_rec), tot = atomic_load(&n_total);
    fprintf(stderr, "trapped calls: %d\n", tot);
    if (n > MAXREC) n = MAXREC;
    for (int i = 0; i < n; i++) {
        rec *r = &recs[i];
        const char *nm = r->nr >= 0 && r->nr <= MAX_NR ? nr_name[r->nr] : "?";
        Dl_info di;
        const char *lib = dladdr(r->ip, &di) && di.dli_fname ? di.dli_fname : "?";
        fprintf(stderr, "TRAP %s(nr=%d a0=%#lx a2=%#lx) at %p [%s]; stack libs:", nm, r->nr, r->a0, r->a2,
                r->ip, lib);
        const char *seen[16];
        int ns = 0;
        for (int k = 0; k < STACKW && ns < 16; k++) {
            if (r->stack[k] < 4096) continue;
            if (!dladdr((void *)r->stack[k], &di) || !di.dli_fname) continue;
            int dup = 0;
            for (int q = 0; q < ns; q++) dup |= !strcmp(seen[q], di.dli_fname);
            if (dup) continue;
            seen[ns++] = di.dli_fname;
            const char *b = strrchr(di.dli_fname, '/');
            fprintf(stderr, " %s", b ? b + 1 : di.dli_fname);
        }
        fputc('\n', stderr);
    }
    int no = atomic_load(&n_open);
    if (no > MAXOPEN) no = MAXOPEN;
    for (int i = 0; i < no; i++) {
        orec *o = &opens[i];
        if (o->nr == __NR_mkdirat)
            fprintf(stderr, "MKDIR %s -> %ld\n", o->path, o->ret);
        else
            fprintf(stderr, "OPEN %s %s%s -> %ld\n", o->path,
                    (o->flags & O_ACCMODE) == O_RDONLY ? "r" : (o->flags & O_ACCMODE) == O_WRONLY ? "w" : "rw",
                    o->flags & O_CREAT ? "+creat" : "", o->ret);
    }
    fprintf(stderr, "RESULT filter=%d fails=%d trapped=%d\n", filter, fails, tot);
    return fails ? 1 : 0;
}
