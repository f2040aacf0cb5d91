import torch, tempfile, transformers, collections
from torch.profiler import profile, ProfilerActivity
from llmkit.checkpoint import load_hf_dir
from llmkit.model import KVCache
cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True)
hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
d = tempfile.mkdtemp(); hf.save_pretrained(d); _, m = load_hf_dir(d)
T=32; ids = torch.randint(0,1000,(1,T+1))
with torch.inference_mode():
    cache = KVCache(m.config, 1, T+1); m(ids[:, :T], positions=torch.arange(T)[None], cache=cache)
    pkv = hf(ids[:, :T], use_cache=True).past_key_values
    for name, f in [("llmkit", lambda: m(ids[:, T:], positions=torch.tensor([[T]]), cache=cache)), ("hf", lambda: (pkv.crop(T), hf(ids[:, T:], past_key_values=pkv, use_cache=True)))]:
        f()
        with profile(activities=[ProfilerActivity.CPU]) as p: f()
        ev = [e for e in p.events() if e.name.startswith("aten::")]
        top = [e for e in ev if not any(True for _ in [])]
        c = collections.Counter(e.name for e in p.events() if e.name.startswith("aten::") and e.cpu_parent is not None and not e.cpu_parent.name.startswith("aten::"))
        print(name, sum(c.values()), c.most_common(40))
