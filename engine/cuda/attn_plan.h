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
    long long fixed_units; /* > 0: the combine entries start this many units after the
                              first, whatever the step's count (a replayed graph's layout) */
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
 * (att_groups) and their key splits, and appends the units (decode groups
 * first) and the combine entries to the plan at *o; points f at their device
 * copies (the plan's ints are uploaded to dp).
 *
 * Splits: when the groups alone make fewer thread blocks than lim->target
 * (a device's worth), a group of `tiles` key tiles whose blocks are nhb
 * gets ns = floor(tiles * target / W) splits, W = the sum of nhb * tiles
 * over all groups, clamped to [1, min(tiles, CU_ATT_MAX_SPLITS)]: all
 * splits together make at most `target` blocks of about W / target tiles
 * each (one wave, no tail), and the tiles of a group are spread evenly
 * (split s covers tiles [s tiles / ns, (s+1) tiles / ns), sizes differ by
 * one at most, none empty).  lim->force_tiles (tests) asks for ns =
 * ceil(tiles / force_tiles) instead.  A plan that needs more partial rows
 * (CU_ATT_PART_ROWS) or units (lim->max_units) than there is room for is
 * made again with half the target (or twice force_tiles): with fewer splits
 * both shrink, down to no splits at all (no partial rows, one unit per
 * group, at most T <= max_units). */
static int plan_attention(const cu_att_limits *lim, const cu_item *items, int n_items, int *hp,
                          size_t *o, const int *dp, cu_fwd *f, char *err, size_t errlen)
{
    const int KT = CU_ATT_KT, G = f->H / f->H_kv;
    const int gb = G < 16 ? G : 16, nhg = (G + gb - 1) / gb, rpg_dec = 16 / gb;
    const long long nhb_dec = (long long)f->H_kv * nhg, nhb_pf = f->H;

    long long blocks0 = 0, work = 0;
    att_groups(items, n_items, rpg_dec, [&](int i, int r, int nr, int pf) {
        const long long tiles = ((long long)items[i].pos0 + r + nr + KT - 1) / KT;
        const long long nhb = pf ? nhb_pf : nhb_dec;
        blocks0 += nhb;
        work += nhb * tiles;
    });

    /* Splits of a group of `tiles` key tiles, for the current tgt / force. */
    long long tgt = 0, force = 0; /* both 0: no splits */
    if (lim->force_tiles > 0) force = lim->force_tiles;
    else if (blocks0 < lim->target) tgt = lim->target;
    auto splits = [&](long long tiles) -> long long {
        long long ns = 1;
        if (force > 0) ns = (tiles + force - 1) / force;
        else if (tgt > 0) ns = tiles * tgt / work;
        if (ns > tiles) ns = tiles;
        if (ns > CU_ATT_MAX_SPLITS) ns = CU_ATT_MAX_SPLITS;
        return ns < 1 ? 1 : ns;
    };
    for (;;) {
        long long prows = 0, units = 0;
        att_groups(items, n_items, rpg_dec, [&](int i, int r, int nr, int) {
            const long long ns = splits(((long long)items[i].pos0 + r + nr + KT - 1) / KT);
            units += ns;
            if (ns > 1) prows += (long long)nr * ns;
        });
        if ((prows <= CU_ATT_PART_ROWS && units <= lim->max_units) || (tgt == 0 && force == 0))
            break;
        tgt /= 2;
        force *= 2;
    }

    /* The units. */
    int *units = hp + *o;
    long long nu = 0, n_dec = 0, pbase = 0;
    int bad = 0;
    att_groups(items, n_items, rpg_dec, [&](int i, int r, int nr, int pf) {
        const int keys = items[i].pos0 + r + nr; /* the group's last row sees keys 0 .. keys-1 */
        const long long tiles = ((long long)keys + KT - 1) / KT;
        const long long ns = splits(tiles);
        if (bad || nu + ns > lim->max_units ||
            (ns > 1 && pbase + (long long)nr * ns > CU_ATT_PART_ROWS)) {
            bad = 1;
            return;
        }
        for (long long sp = 0; sp < ns; sp++) {
            int *u = units + nu * CU_ATT_UNIT_INTS;
            const long long kb = sp * tiles / ns * KT, ke = (sp + 1) * tiles / ns * KT;
            u[0] = i;
            u[1] = items[i].start + r;
            u[2] = nr;
            u[3] = items[i].pos0 + r;
            u[4] = (int)kb;
            u[5] = ke < keys ? (int)ke : keys;
            u[6] = ns > 1 ? (int)(pbase + sp) : -1;
            u[7] = (int)ns;
            nu++;
        }
        if (!pf) n_dec += ns;
        if (ns > 1) pbase += (long long)nr * ns;
    });
    if (bad)
        return eng__errf(err, errlen, ENG_EINVAL,
                         "cuda: step: attention plan exceeds its buffers (%lld units)", nu);
    *o += (size_t)nu * CU_ATT_UNIT_INTS;

    /* The combine entries: every row of a split group, in the same order. */
    if (lim->fixed_units > 0) {
        if (nu > lim->fixed_units)
            return eng__errf(err, errlen, ENG_EINVAL,
                             "cuda: step: %lld attention units exceed the graph's %lld", nu,
                             lim->fixed_units);
        *o += (size_t)(lim->fixed_units - nu) * CU_ATT_UNIT_INTS;
    }
    int *comb = hp + *o;
    long long nc = 0;
    pbase = 0;
    att_groups(items, n_items, rpg_dec, [&](int i, int r, int nr, int) {
        const long long ns = splits(((long long)items[i].pos0 + r + nr + KT - 1) / KT);
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
