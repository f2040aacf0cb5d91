"""The built-in evaluation tasks; importing this package registers them (llmkit.eval.base.register).

- mc.py: multiple choice by log-likelihood (hellaswag, mmlu, truthfulqa_mc1/mc2, generic mc)
- gen.py: generative (gsm8k, mgsm_fr, qa, humaneval)
- text.py: perplexity and the n-gram baseline
"""

from llmkit.eval.tasks import gen, mc, text  # noqa: F401
