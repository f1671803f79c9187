import time, torch, importlib
from transformers import LlamaForCausalLM
import atom_compile
from bench.bench_generate import smollm2_shaped
di = importlib.import_module("atom_compile.runtime_kernels.device_info")
wg = importlib.import_module("atom_compile.runtime_kernels.w4a4_gemm")
qz = importlib.import_module("atom_compile.runtime_kernels.quantize")
ka = importlib.import_module("atom_compile.runtime_kernels.kv_attention")
torch.manual_seed(0)
hf = LlamaForCausalLM(smollm2_shaped()).eval().to("cuda", torch.bfloat16)
q = atom_compile.compile(hf, torch.randint(0, 49152, (4, 128), device="cuda"), "atom-w4a4-rtn", progress=False, backend="triton")
ids = torch.randint(0, 49152, (1, 32), device="cuda")
def step_ms():
    q.generate(ids, 4, cuda_graph=False); torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        t = time.perf_counter(); q.generate(ids, 24, cuda_graph=False); torch.cuda.synchronize(); a = time.perf_counter() - t
        t = time.perf_counter(); q.generate(ids, 4, cuda_graph=False); torch.cuda.synchronize(); b = time.perf_counter() - t
        ts.append((a - b) / 20 * 1e3)
    return sorted(ts)[2]
cached = (di.num_sms, wg.pick_config)
uncached_sms = lambda d: torch.cuda.get_device_properties(d).multi_processor_count if torch.device(d).type == "cuda" else 132
for rnd in range(2):
    for name in ("cached", "uncached"):
        if name == "uncached":
            qz.num_sms = ka.num_sms = uncached_sms; wg.pick_config = wg.pick_config.__wrapped__
        else:
            qz.num_sms = ka.num_sms = cached[0]; wg.pick_config = cached[1]
        print(name, f"{step_ms():.2f} ms per eager decode step", flush=True)
