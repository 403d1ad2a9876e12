"""Recording from training frameworks. Each integration is an optional extra; the core never imports them.

- :mod:`dvemb.integrations.huggingface`: a ``transformers.Trainer`` callback
  (``pip install dvemb[huggingface]``).
"""
