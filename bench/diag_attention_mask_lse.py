"""Two cuDNN questions behind the dense prefill path's prefix route (probe, H100 output committed).

    python -m bench.diag_attention_mask_lse    (output: bench/results/diag_attention_mask_lse_h100.txt)

For a chunk of T queries after C cached keys (bottom-right causal), times SDPA with an explicit boolean mask
(default backend and cuDNN forced), with an additive mask on cuDNN, the memory-efficient kernel, and the route
kv_attention takes: two cuDNN calls (the prefix unmasked, the new keys is_causal) returning log-sum-exps, merged
(here in torch; K/V expanded to the query heads outside the timing). Max abs error against an fp32 math-kernel
reference on the first sequence. Medians in microseconds (CUDA events, 20 runs).
"""
import torch, math, warnings
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
warnings.filterwarnings("ignore")
def bench(f, n=20):
    for _ in range(3): f()
    torch.cuda.synchronize(); es=[]
    for _ in range(n):
        a=torch.cuda.Event(True);b=torch.cuda.Event(True);a.record();f();b.record();torch.cuda.synchronize();es.append(a.elapsed_time(b)*1e3)
    es.sort(); return es[len(es)//2]
dev='cuda'
for (B,T,C,Hq,Hkv) in [(1,2048,2048,32,8),(4,2048,2048,32,8),(1,512,3584,32,32),(1,2048,2048,32,32)]:
    S=T+C; D=128
    q=torch.randn(B,Hq,T,D,device=dev,dtype=torch.bfloat16); k=torch.randn(B,Hkv,S,D,device=dev,dtype=torch.bfloat16); v=torch.randn_like(k)
    mask=torch.arange(S,device=dev)[None,:] <= (C+torch.arange(T,device=dev))[:,None]
    add=torch.zeros(T,S,device=dev,dtype=torch.bfloat16).masked_fill(~mask,float('-inf'))
    with sdpa_kernel([SDPBackend.MATH]):
        ref=F.scaled_dot_product_attention(q[:1].float(),k[:1].float(),v[:1].float(),attn_mask=mask,enable_gqa=Hq!=Hkv)
    res={}
    for name,bk,m in [('default_bool',None,mask),('cudnn_bool',SDPBackend.CUDNN_ATTENTION,mask),('cudnn_add',SDPBackend.CUDNN_ATTENTION,add),('eff_bool',SDPBackend.EFFICIENT_ATTENTION,mask)]:
        def f(bk=bk,m=m):
            if bk is None: return F.scaled_dot_product_attention(q,k,v,attn_mask=m,enable_gqa=Hq!=Hkv)
            with sdpa_kernel([bk]): return F.scaled_dot_product_attention(q,k,v,attn_mask=m,enable_gqa=Hq!=Hkv)
        try:
            res[name]=round(bench(f),1); res[name+'_err']=float((f()[:1].float()-ref).abs().max())
        except Exception as e: res[name]=repr(e)[:100]
    # two-part: prefix full + own causal, combined via lse (cudnn raw op)
    try:
        kk=k.repeat_interleave(Hq//Hkv,1) if Hq!=Hkv else k; vv=v.repeat_interleave(Hq//Hkv,1) if Hq!=Hkv else v
        def two():
            o1,l1=torch.ops.aten._scaled_dot_product_cudnn_attention(q,kk[:,:,:C],vv[:,:,:C],None,True,0.0,False,False,scale=1/math.sqrt(D))[:2]
            o2,l2=torch.ops.aten._scaled_dot_product_cudnn_attention(q,kk[:,:,C:],vv[:,:,C:],None,True,0.0,True,False,scale=1/math.sqrt(D))[:2]
            return o1,l1,o2,l2
        res['two_part_cudnn']=round(bench(two),1)
        o1,l1,o2,l2=two(); print('lse shapes', l1.shape, l1.dtype, o1.shape, o1.stride())
        l1=l1.view(B,Hq,T,1).float(); l2=l2.view(B,Hq,T,1).float(); mx=torch.maximum(l1,l2)
        o=(o1.float()*torch.exp(l1-mx)+o2.float()*torch.exp(l2-mx))/(torch.exp(l1-mx)+torch.exp(l2-mx))
        res['two_part_err']=float((o[:1]-ref).abs().max())
    except Exception as e: res['two_part_cudnn']=repr(e)[:200]
    print(B,T,C,Hq,Hkv,res,flush=True)
