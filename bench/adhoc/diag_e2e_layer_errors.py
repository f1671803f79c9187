"""Layer-by-layer agreement of the compiled SmolLM2 (atom-w4a4-rtn) with the independent Atom simulation
(tests/independent_atom.py), per channel order and 256-token window: the numbers behind the bound in
tests/test_end_to_end.py. CPU.

    PYTHONPATH=. python bench/adhoc/diag_e2e_layer_errors.py chunks score > bench/adhoc/diag_e2e_layer_errors.txt
    PYTHONPATH=. python bench/adhoc/diag_e2e_layer_errors.py --f64 --windows 1 chunks >> bench/adhoc/diag_e2e_layer_errors.txt
"""
import copy, sys
sys.path.insert(0, "tests")
import torch, atom_compile
from atom_compile.config import get_config
from atom_compile.data import tokenize, windows, read_text
from independent_atom import simulate_atom
from test_end_to_end import _layer_errors, GRAPH_INPUTS
from conftest import data_file
model, tok = atom_compile.load_model("smollm2-135m")
if "--f64" in sys.argv: model = model.double(); sys.argv.remove("--f64")
N_WINDOWS = 3
if "--windows" in sys.argv:
    i = sys.argv.index("--windows"); N_WINDOWS = int(sys.argv[i + 1]); del sys.argv[i:i + 2]
calib = windows(tokenize(read_text(data_file("enwiki_calib.txt")), tok), 256, 8, seed=0)
ev = windows(tokenize(read_text(data_file("enwiki_eval.txt"))[:200_000], tok), 256, 4)
for order in sys.argv[1:]:
    cfg = get_config("atom-w4a4-rtn", channel_order=order)
    q = atom_compile.compile(model, calib, cfg, progress=False)
    orders = {i: {k: gm.meta["atom.outlier_order"][g] for g, k in GRAPH_INPUTS.items()} for i, gm in enumerate(q.layers)}
    sim, _ = simulate_atom(copy.deepcopy(model), None, q.atom_config, orders=orders)
    for w in range(N_WINDOWS):
        e = _layer_errors(q, sim, ev[w:w+1])
        print(order, "float64" if model.dtype == torch.float64 else "float32", "window", w, f"median {e.median():.2e} max {e.max():.2e} argmax {int(e.argmax())} layer0 {e[0]:.2e}", flush=True)
