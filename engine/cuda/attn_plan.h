/*
 * attn_plan.h — host-side planning of the tensor-core attention of one step
 * (design notes: kernels.cu, "paged causal GQA attention"): row groups, key
 * splits, partial rows and combine entries.
 *
 * Included by backend.cu (pack_plan) and by engine/cuda/attn_emu.cc, the CPU
 * emulation of the kernels, which drives them with these plans.
 */
#ifndef MKAD_ENGINE_CUDA_ATTN_PLAN_H
#define MKAD_ENGINE_CUDA_ATTN_PLAN_H

#include "cuda_priv.h"

/* What bounds a step's attention plan (fixed at init). */
typedef struct cu_att_limits {
    long long target;  /* thread blocks that fill the device once (att_target) */
    long long force_tiles; /* key tiles per split, 0 = automatic (MKAD_CUDA_ATTN_SPLIT) */
    long long max_units;   /* units the plan has room for */
} cu_att_limits;

/* Calls fn(item, r, nr, pf) for every row group of the step's attention:
 * rows r .. r+nr-1 of the item.  Items of fewer than CU_ATT_PF_ROWS rows
 * make decode groups of rpg_dec rows, all of them first; longer items make
 * prefill groups of 64 rows, each item's last (longest-running, causal)
 * group first.  The order is the unit order and the partial-row order. */
template <typename Fn>
static void att_groups(const cu_item *items, int n_items, int rpg_dec, Fn fn)
{
    for (int i = 0; i < n_items; i++) {
        const int n = items[i].n_tokens;
        if (n >= CU_ATT_PF_ROWS) continue;
        for (int r = 0; r < n; r += rpg_dec) fn(i, r, n - r < rpg_dec ? n - r : rpg_dec, 0);
    }
    for (int i = 0; i < n_items; i++) {
        const int n = items[i].n_tokens;
        if (n < CU_ATT_PF_ROWS) continue;
        for (int r = (n - 1) / 64 * 64; r >= 0; r -= 64) fn(i, r, n - r < 64 ? n - r : 64, 1);
    }
}

/* Plans the attention of a step for the tensor-core kernels: its row groups
 * (att_groups), and when they alone would not fill the device (fewer thread
 * blocks than lim->target) key splits of `chunk` tiles, so that the blocks of
 * all groups' splits fill it about once; splits that would need more
 * partial rows or units than there is room for are made larger.  Appends the
 * units (decode groups first) and the combine entries to the plan at *o and
 * points f at their device copies (the plan's ints are uploaded to dp). */
static int plan_attention(const cu_att_limits *lim, const cu_item *items, int n_items, int *hp,
                          size_t *o, const int *dp, cu_fwd *f, char *err, size_t errlen)
{
    const int KT = CU_ATT_KT, G = f->H / f->H_kv;
    const int gb = G < 16 ? G : 16, nhg = (G + gb - 1) / gb, rpg_dec = 16 / gb;
    const long long nhb_dec = (long long)f->H_kv * nhg, nhb_pf = f->H;
    const long long target = lim->target > 0 ? lim->target : 1;

    long long blocks0 = 0, work = 0, max_tiles = 0;
    att_groups(items, n_items, rpg_dec, [&](int i, int r, int nr, int pf) {
        const long long tiles = ((long long)items[i].pos0 + r + nr + KT - 1) / KT;
        const long long nhb = pf ? nhb_pf : nhb_dec;
        blocks0 += nhb;
        work += nhb * tiles;
        if (tiles > max_tiles) max_tiles = tiles;
    });

    long long chunk = 0; /* key tiles per split; 0: no splits */
    if (lim->force_tiles > 0) chunk = lim->force_tiles;
    else if (blocks0 < target) chunk = (work + target - 1) / target;
    if (chunk > 0) {
        const long long minc = (max_tiles + CU_ATT_MAX_SPLITS - 1) / CU_ATT_MAX_SPLITS;
        if (chunk < minc) chunk = minc;
        if (chunk < 1) chunk = 1;
        /* Terminates: once chunk >= max_tiles nothing is split (no partial
         * rows, one unit per group, at most T <= att_max_units). */
        for (;;) {
            long long prows = 0, units = 0;
            att_groups(items, n_items, rpg_dec, [&](int i, int r, int nr, int) {
                const long long tiles = ((long long)items[i].pos0 + r + nr + KT - 1) / KT;
                const long long ns = (tiles + chunk - 1) / chunk;
                units += ns;
                if (ns > 1) prows += (long long)nr * ns;
            });
            if (prows <= CU_ATT_PART_ROWS && units <= (long long)lim->max_units) break;
            chunk *= 2;
        }
    }

    /* The units. */
    int *units = hp + *o;
    long long nu = 0, n_dec = 0, pbase = 0;
    int bad = 0;
    att_groups(items, n_items, rpg_dec, [&](int i, int r, int nr, int pf) {
        const int keys = items[i].pos0 + r + nr; /* the group's last row sees keys 0 .. keys-1 */
        const long long tiles = ((long long)keys + KT - 1) / KT;
        const long long ns = chunk > 0 ? (tiles + chunk - 1) / chunk : 1;
        if (ns > CU_ATT_MAX_SPLITS || nu + ns > (long long)lim->max_units ||
            (ns > 1 && pbase + (long long)nr * ns > CU_ATT_PART_ROWS)) {
            bad = 1;
            return;
        }
        for (long long sp = 0; sp < ns; sp++) {
            int *u = units + nu * CU_ATT_UNIT_INTS;
            const long long kb = sp * chunk * KT, ke = (sp + 1) * chunk * KT;
            u[0] = i;
            u[1] = items[i].start + r;
            u[2] = nr;
            u[3] = items[i].pos0 + r;
            u[4] = ns > 1 ? (int)kb : 0;
            u[5] = ns > 1 && ke < keys ? (int)ke : keys;
            u[6] = ns > 1 ? (int)(pbase + sp) : -1;
            u[7] = (int)ns;
            nu++;
        }
        if (!pf) n_dec += ns;
        if (ns > 1) pbase += (long long)nr * ns;
    });
    if (bad)
        return eng__errf(err, errlen, ENG_EINVAL,
                         "cuda: step: attention plan exceeds its buffers (%lld tiles per split)",
                         chunk);
    *o += (size_t)nu * CU_ATT_UNIT_INTS;

    /* The combine entries: every row of a split group, in the same order. */
    int *comb = hp + *o;
    long long nc = 0;
    pbase = 0;
    att_groups(items, n_items, rpg_dec, [&](int i, int r, int nr, int) {
        const long long tiles = ((long long)items[i].pos0 + r + nr + KT - 1) / KT;
        const long long ns = chunk > 0 ? (tiles + chunk - 1) / chunk : 1;
        if (ns <= 1) return;
        for (int k = 0; k < nr; k++) {
            int *c = comb + nc * CU_ATT_COMB_INTS;
            c[0] = items[i].start + r + k;
            c[1] = (int)(pbase + (long long)k * ns);
            c[2] = (int)ns;
            c[3] = 0;
            nc++;
        }
        pbase += (long long)nr * ns;
    });
    const size_t o_units = (size_t)(units - hp), o_comb = (size_t)(comb - hp);
    *o += (size_t)nc * CU_ATT_COMB_INTS;

    f->att_units = dp + o_units;
    f->att_n_dec = (int)n_dec;
    f->att_n_pf = (int)(nu - n_dec);
    f->att_comb = dp + o_comb;
    f->att_n_comb = (int)nc;
    return ENG_OK;
}

#endif /* MKAD_ENGINE_CUDA_ATTN_PLAN_H */
