import time, torch, importlib
from transformers import LlamaForCausalLM
import atom_compile
from bench.bench_generate import smollm2_shaped
ka = importlib.import_module("atom_compile.runtime_kernels.kv_attention")
orig = ka.attention_config
def four_warps(q, k_cache, *a, **kw):
    args = list(a)
    if len(args) >= 5 and args[4] is None:
        args[4] = 4
    elif len(args) < 5 and kw.get("num_warps") is None:
        kw["num_warps"] = 4
    return orig(q, k_cache, *args, **kw)
torch.manual_seed(0)
hf = LlamaForCausalLM(smollm2_shaped()).eval().to("cuda", torch.bfloat16)
q = atom_compile.compile(hf, torch.randint(0, 49152, (4, 128), device="cuda"), "atom-w4a4-rtn", progress=False, backend="triton")
def step_ms(B, T):
    ids = torch.randint(0, 49152, (B, T), device="cuda")
    def run(n):
        torch.cuda.synchronize(); t = time.perf_counter(); q.generate(ids, n, cuda_graph=True); torch.cuda.synchronize()
        return time.perf_counter() - t
    run(8)
    ts = sorted((run(72) - run(8)) / 64 * 1e3 for _ in range(3))
    return ts[1]
for B, T in ((64, 1024), (64, 256), (128, 1024)):
    for name in ("rule", "four warps", "rule"):
        ka.attention_config = orig if name == "rule" else four_warps
        print(f"B={B} prompt={T} {name}: {step_ms(B, T):.3f} ms per graphed decode step", flush=True)
