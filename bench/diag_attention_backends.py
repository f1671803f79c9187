"""Which of torch's attention backends is fast on the H100 for a prefill (probe behind the dense prefill path).

    python -m bench.diag_attention_backends     (output of 2026-11-22: bench/results/diag_attention_backends_h100.txt)

Times SDPA with its default choice and with each backend forced (flash = FA2, cuDNN, memory-efficient), and
aten._flash_attention_forward in its varlen form with seqused_k (which could take ragged lengths and a cached
prefix), at the Llama-7B layer's prefill (MHA, 4096 tokens) and bench_attention's GQA cases; then checks that the
varlen form's causal mask is aligned bottom-right on ragged lengths (against an explicit-mask reference).
Medians in microseconds (CUDA events, 20 runs).
"""
import torch, time, inspect, math
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
print(torch.__version__, torch.cuda.get_device_name())
print(torch.ops.aten._flash_attention_forward.default._schema)
print(torch.ops.aten._cudnn_attention_forward.default._schema if hasattr(torch.ops.aten,'_cudnn_attention_forward') else 'no cudnn fwd')
try:
    import torch.nn.attention.varlen as V; print(inspect.signature(V.varlen_attn))
except Exception as e: print('varlen', e)
try: print('prio', torch._C._get_sdp_priority_order())
except Exception as e: print(e)
dev='cuda'
def bench(f, n=20):
    for _ in range(3): f()
    torch.cuda.synchronize()
    es=[]
    for _ in range(n):
        a=torch.cuda.Event(True);b=torch.cuda.Event(True);a.record();f();b.record();torch.cuda.synchronize();es.append(a.elapsed_time(b)*1e3)
    es.sort(); return es[len(es)//2]
for (B,T,C,Hq,Hkv) in [(1,4096,0,32,32),(1,2048,0,32,8),(4,2048,0,32,8),(1,2048,2048,32,8)]:
    S=T+C; D=128
    q=torch.randn(B,Hq,T,D,device=dev,dtype=torch.bfloat16)
    k=torch.randn(B,Hkv,S,D,device=dev,dtype=torch.bfloat16); v=torch.randn_like(k)
    flops=4*B*Hq*D*(T*C+T*T/2)
    res={}
    for name,bk in [('default',None),('flash',SDPBackend.FLASH_ATTENTION),('cudnn',SDPBackend.CUDNN_ATTENTION),('eff',SDPBackend.EFFICIENT_ATTENTION)]:
        try:
            if bk is None: f=lambda: F.scaled_dot_product_attention(q,k,v,is_causal=True,enable_gqa=Hq!=Hkv)
            else:
                def f(bk=bk):
                    with sdpa_kernel([bk]): return F.scaled_dot_product_attention(q,k,v,is_causal=True,enable_gqa=Hq!=Hkv)
            res[name]=bench(f)
        except Exception as e: res[name]=repr(e)[:80]
    # varlen flash with seqused_k: packed [B*S, Hkv, D]
    qp=q.transpose(1,2).reshape(B*T,Hq,D).contiguous(); kp=k.transpose(1,2).reshape(B*S,Hkv,D).contiguous(); vp=v.transpose(1,2).reshape(B*S,Hkv,D).contiguous()
    cq=torch.arange(B+1,device=dev,dtype=torch.int32)*T; ck=torch.arange(B+1,device=dev,dtype=torch.int32)*S
    used=torch.full((B,),S,device=dev,dtype=torch.int32)
    try:
        f=lambda: torch.ops.aten._flash_attention_forward(qp,kp,vp,cq,ck,T,S,0.0,True,False,scale=1/math.sqrt(D),seqused_k=used)
        res['aten_flash_varlen']=bench(f)
        o=f()[0].view(B,T,Hq,D).transpose(1,2)
        if C==0:
            with sdpa_kernel([SDPBackend.MATH]): r=F.scaled_dot_product_attention(q.float(),k.float(),v.float(),is_causal=True,enable_gqa=Hq!=Hkv)
            res['varlen_err']=float((o.float()-r).abs().max())
    except Exception as e: res['aten_flash_varlen']=repr(e)[:200]
    print(B,T,C,Hq,Hkv,{k_:(round(v_,1) if isinstance(v_,float) else v_) for k_,v_ in res.items()}, 'TFLOPs at default', flops/res['default']/1e6 if isinstance(res['default'],float) else None, flush=True)
# semantics: ragged seqused_k with bottom-right causal and a cached prefix
B,T,S,Hq,Hkv,D=3,5,12,4,2,64
q=torch.randn(B*T,Hq,D,device=dev,dtype=torch.bfloat16); k=torch.randn(B*S,Hkv,D,device=dev,dtype=torch.bfloat16); v=torch.randn_like(k)
lens=torch.tensor([12,7,5],device=dev,dtype=torch.int32)
cq=torch.arange(B+1,device=dev,dtype=torch.int32)*T; ck=torch.arange(B+1,device=dev,dtype=torch.int32)*S
o=torch.ops.aten._flash_attention_forward(q,k,v,cq,ck,T,S,0.0,True,False,scale=1/math.sqrt(D),seqused_k=lens)[0]
kk=k.view(B,S,Hkv,D).transpose(1,2).float(); vv=v.view(B,S,Hkv,D).transpose(1,2).float(); qq=q.view(B,T,Hq,D).transpose(1,2).float()
qpos=lens.long().view(B,1)-T+torch.arange(T,device=dev)
allowed=torch.arange(S,device=dev).view(1,1,S)<=qpos.unsqueeze(-1)
r=F.scaled_dot_product_attention(qq,kk,vv,attn_mask=allowed.unsqueeze(1),enable_gqa=True).transpose(1,2).reshape(B*T,Hq,D)
print('ragged semantics max err', float((o.float()-r).abs().max()))
