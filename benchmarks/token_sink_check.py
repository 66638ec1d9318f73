"""Quick check behind the README note on the attention sink: the default token routers skip the first token at
most layers; forcing it to run at every token-routed layer (a monkeypatch here, not library behaviour) and
scoring 16 LAMBADA texts (tradeoff.score_texts: KL to dense per scored token, skip of (scored token, layer) pairs)."""
# quick check (not library code): token routers with the first token forced to run at every layer
import torch
from routertune import RoutedModel, tradeoff, token_routing
from routertune.models import load_model_and_tokenizer
model, tok = load_model_and_tokenizer()
routed = RoutedModel.from_pretrained(model, "benchmarks/results/routers-token")
lists = [tok(t)["input_ids"][:192] for t in tradeoff.domain_texts("lambada", 16)]
batches = tradeoff.text_batches(lists, tok.pad_token_id or 0)
variants = [tradeoff.Variant("routers", threshold=t) for t in (0.41, 0.50, 0.535)]
def run(tag):
    s = tradeoff.score_texts(routed, batches, variants, len(lists))
    for v in variants:
        print(tag, v.name, "skip %.3f KL %.3f" % (s[v].skipped.mean() / 30, s[v].kl.sum() / s[v].tokens.sum()))
run("as is")
orig = token_routing.TokenRoutedSublayer._decide_tokens
def patched(self, call, x):
    runs = orig(self, call, x)
    if call.past_length == 0:
        real = token_routing._real_tokens(call.attention_mask, x.shape[0], x.shape[1], x.device)
        first = real & (real.long().cumsum(1) == 1)
        runs = runs | first
        call.token_runs[self.layer_idx] = runs
    return runs
token_routing.TokenRoutedSublayer._decide_tokens = patched
run("first token always runs")
