"""Does cuDNN's fused attention op take GQA's fewer K/V heads unexpanded? (probe behind kv_attention's prefix route)

    python -m bench.diag_cudnn_gqa    (output: bench/results/diag_cudnn_gqa_h100.txt)
"""
import torch, math
B,T,P,Hq,Hkv,D=1,2048,2048,32,8,128
q=torch.randn(B,Hq,T,D,device='cuda',dtype=torch.bfloat16); k=torch.randn(B,Hkv,P,D,device='cuda',dtype=torch.bfloat16); v=torch.randn_like(k)
ke=k.repeat_interleave(Hq//Hkv,1); ve=v.repeat_interleave(Hq//Hkv,1)
oe,le=torch.ops.aten._scaled_dot_product_cudnn_attention(q,ke,ve,None,True,0.0,False,False,scale=1/math.sqrt(D))[:2]
try:
    o,l=torch.ops.aten._scaled_dot_product_cudnn_attention(q,k,v,None,True,0.0,False,False,scale=1/math.sqrt(D))[:2]
    print('cudnn raw GQA ok; max diff vs expanded', float((o.float()-oe.float()).abs().max()), float((l-le).abs().max()))
except Exception as e: print('cudnn raw GQA refused:', repr(e)[:200])
