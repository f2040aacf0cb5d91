import torch, time, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
dev="cuda"; dt=torch.bfloat16
def tm(f, n=200):
    for _ in range(10): f()
    torch.cuda.synchronize(); t=time.perf_counter()
    for _ in range(n): f()
    torch.cuda.synchronize(); return (time.perf_counter()-t)/n*1e6
for T,S in [(1,512),(1,4096),(512,512)]:
    q=torch.randn(1,9,T,64,device=dev,dtype=dt); k=torch.randn(1,3,S,64,device=dev,dtype=dt); v=torch.randn_like(k)
    m=torch.ones(1,1,T,S,dtype=torch.bool,device=dev).tril(S-T)
    a=lambda: F.scaled_dot_product_attention(q,k,v,attn_mask=m,enable_gqa=True)
    def b():
        qf=q.reshape(1,3,3*T,64); mf=m.expand(1,1,T,S).repeat(1,1,3,1) if T>1 else m.expand(1,1,3,S)
        return F.scaled_dot_product_attention(qf,k,v,attn_mask=mf).view(1,9,T,64)
    kr,vr=k.repeat_interleave(3,1),v.repeat_interleave(3,1)
    c=lambda: F.scaled_dot_product_attention(q,k.repeat_interleave(3,1),v.repeat_interleave(3,1),attn_mask=m)
    d=lambda: F.scaled_dot_product_attention(q,k,v,is_causal=T>1,enable_gqa=True)
    ref=a().float()
    if T == 1: print("fold maxdiff", (b().float()-ref).abs().max().item())
    print(T,S,"gqa+mask %.1fus"%tm(a), "fold+mask %.1fus"%tm(b) if T==1 else "", "repeat+mask %.1fus"%tm(c), "gqa nomask/causal %.1fus"%tm(d))
    for be in [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]:
        try:
            with sdpa_kernel([be]): a()
            print("  gqa+mask ok on", be)
        except Exception as e: print("  gqa+mask not on", be, str(e).splitlines()[0][:80])
