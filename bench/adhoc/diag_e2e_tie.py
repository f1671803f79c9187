"""Why layer 0 of the first window differs from the independent simulation even in float64 (see
tests/test_end_to_end.py): the input quantizer's codes against the simulation's fake quant of the same rows, and
the one INT8 outlier code that differs, as x / scale from transformers' RMSNorm (float32 inside) and from a float64
RMSNorm. CPU.

    PYTHONPATH=. python bench/adhoc/diag_e2e_tie.py > bench/adhoc/diag_e2e_tie.txt
"""
import copy, sys
sys.path.insert(0, "tests")
import torch, atom_compile
from atom_compile.config import get_config
from atom_compile.data import tokenize, windows, read_text
from atom_compile.instruments import CaptureValues
from atom_compile import quant
from independent_atom import simulate_atom
from fake_quant import fake_quant_rows
from test_end_to_end import GRAPH_INPUTS
from conftest import data_file
model, tok = atom_compile.load_model("smollm2-135m"); model = model.double()
calib = windows(tokenize(read_text(data_file("enwiki_calib.txt")), tok), 256, 8, seed=0)
ev = windows(tokenize(read_text(data_file("enwiki_eval.txt"))[:200_000], tok), 256, 4)
cfg = get_config("atom-w4a4-rtn", channel_order="chunks")
q = atom_compile.compile(model, calib, cfg, progress=False)
orders = {i: {k: gm.meta["atom.outlier_order"][g] for g, k in GRAPH_INPUTS.items()} for i, gm in enumerate(q.layers)}
sim, _ = simulate_atom(copy.deepcopy(model), None, q.atom_config, orders=orders)
x = ev[0:1]
seen = {}
h = sim.model.layers[0].register_forward_hook(lambda m, a, kw, out: [seen.setdefault(0, (kw.get("hidden_states", a[0] if a else None), out[0] if isinstance(out, tuple) else out)), None][1], with_kwargs=True)
# capture the inputs of the sim's linears of layer 0 (after its own fake quant? record raw inputs)
lin_in = {}
for name, mod in sim.model.layers[0].named_modules():
    if name.endswith("proj"):
        mod.register_forward_pre_hook(lambda m, a, name=name: [lin_in.setdefault(name, a[0].detach().clone()), None][1])
        mod.register_forward_hook(lambda m, a, o, name=name: [lin_in.setdefault(name + ".out", o.detach().clone()), None][1])
with torch.no_grad():
    sim(x)
hidden, expected = seen[0]
positions = torch.arange(x.shape[1]).unsqueeze(0)
cache = q.new_cache(1, x.shape[1])
cos, sin = q.rotary(hidden, positions)
gm = q.layers[0]
c = CaptureValues(gm)
with torch.no_grad():
    out = c.run(hidden, cos, sin, cache.seqlens, *cache.layers[0])
print("layer0 rel err", float((out - expected).norm() / expected.norm()))
v = c.values
for n in ["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "attention"]:
    if n in v: print(n, v[n].shape if hasattr(v[n], "shape") else type(v[n]))
print("sim linear outputs:", [(k, t.shape) for k, t in lin_in.items() if k.endswith(".out")])
def rel(a, b): return float((a.double() - b.double()).norm() / b.double().norm())
print("q_proj out vs ours qkv[:, :, :576]", rel(v["qkv_proj"][..., :576], lin_in["self_attn.q_proj.out"]))
print("o_proj", rel(v["o_proj"], lin_in["self_attn.o_proj.out"]))
print("down", rel(v["down_proj"], lin_in["mlp.down_proj.out"]))
torch.save({"v": v, "lin": lin_in}, "/tmp/tie.pt")
layer = sim.model.layers[0]
with torch.no_grad():
    normed = layer.input_layernorm(hidden)
perm = orders[0]["qkv"]
xp = normed[..., perm]
spec = q.atom_config.resolve(576)
fq = fake_quant_rows(xp, spec, "act")
codes, scales, outl, oscale = v["input_layernorm_quant"]
g = spec.group_size
units = quant.unpack_nibbles(codes, g).double()
deq = (units.reshape(1, 256, -1, g) * scales.double().unsqueeze(-1)).reshape(1, 256, -1)
ours = torch.cat([deq, outl.double() * oscale.double()], -1)
d = (ours - fq.double()).abs()
print("act quant: max diff", float(d.max()), "n diff", int((d > 1e-5).sum()))
idx = torch.nonzero(d > 1e-5)[:5]
for t in idx.tolist():
    b, r, c = t
    grp = c // g
    print("row", r, "pos", c, "x", float(xp[b, r, c]), "ours", float(ours[b, r, c]), "sim", float(fq[b, r, c]), "scale ours", float(scales[b, r, grp]) if c < deq.shape[-1] else None)
r, c = 75, 565
xs = xp[0, r, c]
osc = oscale[0, r, 0].double()
print("sim x / ours scale", float(xs / osc))
w = layer.input_layernorm.weight
hs = hidden[0, r].double()
n64 = hs * torch.rsqrt((hs * hs).mean() + layer.input_layernorm.variance_epsilon) 
x64 = (w.double() * n64)[perm[c]]
print("float64 norm x / scale", float(x64 / osc), "hf x", float(xs), "f64 x", float(x64))
