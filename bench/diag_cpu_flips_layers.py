"""Ours vs the independent simulation (tests/independent_atom.py), layer by layer and by perplexity, in
float32 and float64 (the figures in tests/test_end_to_end.py).  python bench/diag_cpu_flips_layers.py"""
import copy, sys, torch, atom_compile
sys.path.insert(0, "tests")
from independent_atom import simulate_atom
from atom_compile.data import read_text, tokenize, windows
from atom_compile.evaluate import perplexity
GRAPH_INPUTS = {"input_layernorm": "qkv", "attention": "o", "post_attention_layernorm": "gu", "mlp_act": "down"}
model, tok = atom_compile.load_model("smollm2-135m")
calib = windows(tokenize(read_text("../shared/data/enwiki_calib.txt"), tok), 256, 8, seed=0)
ev = windows(tokenize(read_text("../shared/data/enwiki_eval.txt")[:200_000], tok), 256, 4)
x = ev[:1]
for dt in (torch.float32, torch.float64):
    m = copy.deepcopy(model).to(dt)
    cfg = atom_compile.get_config("atom-w4a4-rtn")
    q = atom_compile.compile(m, calib, cfg, progress=False)
    orders = {i: {k: gm.meta["atom.outlier_order"][g] for g, k in GRAPH_INPUTS.items()} for i, gm in enumerate(q.layers)}
    sim, _ = simulate_atom(copy.deepcopy(m), None, cfg, orders=orders)
    io = {}
    hooks = [l.register_forward_hook(lambda mod, args, kw, out, i=i: io.__setitem__(i, (kw.get("hidden_states", args[0] if args else None), out[0] if isinstance(out, tuple) else out)), with_kwargs=True) for i, l in enumerate(sim.model.layers)]
    with torch.no_grad():
        sim(x)
        errs = []
        for i, layer in enumerate(q.layers):
            h_in, h_out = io[i]
            cache = q.new_cache(1, x.shape[1])
            pos = torch.arange(x.shape[1]).unsqueeze(0)
            cos, sin = q.rotary(h_in, pos)
            ours = layer(h_in, cos, sin, cache.seqlens, *cache.layers[i])
            d = (ours - h_out)
            errs.append((d.norm() / h_out.norm()).item())
            frac = ((d.abs() > 1e-3 * h_out.abs().max()).double().mean()).item()
            if i % 6 == 0: print(dt, i, f"rel {errs[-1]:.2e} frac>1e-3max {frac:.2e}")
    print(dt, "max rel", max(errs))
    p1 = perplexity(q, ev, progress=False)["ppl"]; p2 = perplexity(lambda t: sim(t).logits, ev, progress=False)["ppl"]
    print(dt, "ppl", p1, p2, p1 / p2 - 1)
