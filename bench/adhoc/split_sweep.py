import torch, triton, itertools
from bench.bench_gemm import GROUP, make_problem, n_sets, weight_bytes, wk
from bench.common import bench_us
res = []
for N, K in ((4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096)):
    for M in (16, 64):
        _, _, xq, wq = make_problem(M, N, K)
        x16 = wk.unpack_activations(xq[0], GROUP)
        G = x16.shape[1] // GROUP
        pw0 = wk.prepare_weight(*wq, GROUP)
        k = n_sets(weight_bytes(pw0))
        pws = [pw0] + [wk.prepare_weight(*(t.clone() for t in wq), GROUP) for _ in range(k - 1)]
        out = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
        xs, xo, xos = xq[1].float(), xq[2], xq[3].reshape(M, 1).float()
        d = wk.pick_config(M, N, G)
        cfgs = [d] + [wk.Config(block_n=bn, block_m=d.block_m, split_k=s, num_stages=st)
                      for bn in (64, 128) for s in (1, 2, 3, 4, 6, 8) for st in (4, 6, 8, 10)]
        rows = []
        for cfg in cfgs:
            fns = [lambda p=p, c=cfg: wk._launch(x16, xs, xo, xos, p, None, out, c, x_given_unpacked=True) for p in pws]
            try:
                us = bench_us(fns[0], rotate=fns)
            except Exception as e:
                continue
            rows.append((us, cfg))
        rows.sort(key=lambda r: r[0])
        dus = [u for u, c in rows if c == d][0]
        print(f"{N}x{K} M={M}: default {dus:.2f} us (s{d.split_k} st{d.num_stages}); best:", 
              "; ".join(f"{u:.2f} n{c.block_n} s{c.split_k} st{c.num_stages}" for u, c in rows[:4]), flush=True)
