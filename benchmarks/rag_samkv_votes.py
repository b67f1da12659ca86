"""What samkv's votes pick on 1hop, per spec and seed, faster than the suite: the rank of the answer's first digit
among the document tokens by the method's smoothed votes, how many of the answer's digits the selection keeps, the
document it ranks most relevant against the answer's, and the score of the greedy answer. Embedded model, CPU.

    python benchmarks/rag_samkv_votes.py --seeds 0-7 "samkv" "samkv:voters=window,alloc=votes,back=0"
"""

import argparse

import torch

from kvbench.models import load_model
from kvbench.rag import Scene, parse_rag, store_documents
from kvbench.rag_tasks import make_instance, scores
from kvbench.suites.accuracy import _seeds
from kvbench.suites.rag import decode_answer


def answer_digits(tok, inst) -> list[int]:
    """Document positions (from 0 at the first document) of the answer's digits in its document."""
    d = inst.info["answer_docs"][0]
    ids, code = inst.prompt.docs[d], inst.answers[0]
    start = sum(map(len, inst.prompt.docs[:d]))
    text = [tok.decode([i]) for i in ids]
    for i in range(len(ids)):  # the first run of tokens that spells the code
        if "".join(text[i:i + len(code)]).strip() == code and text[i].strip():
            return [start + i + k for k in range(len(code))]
    raise ValueError(f"code {code} not found in document {d}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--seeds", default="0-7")
    ap.add_argument("--documents", type=int, default=6)
    ap.add_argument("--doc-tokens", type=int, default=192)
    args = ap.parse_args()
    model, tok = load_model("embedded", device="cpu")
    totals = {s: [] for s in args.specs}
    for seed in _seeds(args.seeds, "--seeds"):
        inst = make_instance(tok, "1hop", args.documents, args.doc_tokens, seed)
        digits, P = answer_digits(tok, inst), len(inst.prompt.prefix)
        with torch.inference_mode():
            stored = store_documents(model, inst.prompt)
            for spec in args.specs:
                method = parse_rag(spec)
                votes, relevance = method.votes(Scene(model, inst.prompt, stored))
                kept = set((method.select(Scene(model, inst.prompt, stored)).keep - P).tolist())
                cache, logits, _ = method.first_token(Scene(model, inst.prompt, stored))
                toks, _ = decode_answer(model, tok, cache, logits, inst.max_new_tokens)
                pred = tok.decode(toks, skip_special_tokens=True)
                score = scores(inst, pred)["score"]
                totals[spec].append(score)
                top = "-" if relevance is None else int(relevance.argmax())
                print(f"seed {seed} {spec:45s} rank {int((votes > votes[digits[0]]).sum()):4d} of {len(votes)}  "
                      f"digits kept {sum(i in kept for i in digits)}/{len(digits)}  top document {top} "
                      f"(answer's {inst.info['answer_docs'][0]})  score {score:.0f}  {pred.strip()!r}", flush=True)
    for spec, xs in totals.items():
        print(f"{spec:45s} score {sum(xs) / len(xs):.3f} over {len(xs)} seeds")


if __name__ == "__main__":
    main()
