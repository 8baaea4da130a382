"""
Exercise 10: read what `generate.py --report` measured (report.json) and say how the image's
share of attention falls as the answer grows, per third of the decoder, next to what pure
dilution predicts.

    python train.py --size tiny --max-steps 1 --eval-every 0 --out out/tiny   # a backbone, CPU
    python generate.py --model out/tiny/backbone --image cat.jpg --temperature 0 \\
        --max-new-tokens 64 --report out/report.png
    python exercises/measure.py out/report.json

report.json (report.py) holds image_share[n][layer]: the attention that the query choosing the
(n+1)-th generated token puts on the image's tokens, summed over them, mean over heads; and
prompt_tokens, image_tokens. That query attends to prompt_tokens + n keys.
"""
import argparse
import json
import sys

import torch


def keys_attended(prompt_tokens, n):
    """(n,) float64: how many keys the query of each of n generated tokens attends to: the
    prompt, and the tokens generated before it."""
    return prompt_tokens + torch.arange(n, dtype=torch.float64)


def layer_groups(image_share, groups=3):
    """image_share (N, L), generated position by layer -> (N, groups) float64: at each position,
    the mean share over each group of consecutive layers (early, middle, late). The layers split
    as torch.tensor_split splits them: where L is no multiple of `groups`, the first groups hold
    one layer more."""
    share = torch.as_tensor(image_share, dtype=torch.float64)
    return torch.stack([part.mean(dim=1) for part in share.tensor_split(groups, dim=1)], dim=1)


def dilution(first_share, prompt_tokens, n):
    """(n,) float64: the share that pure dilution predicts for each of n generated tokens: the
    first token's share times the keys it attended to over the keys each token attends to."""
    keys = keys_attended(prompt_tokens, n)
    return first_share * keys[0] / keys


def decay_exponent(share, prompt_tokens):
    """The exponent a of share ~ c * keys^a over the generated tokens, fitted by least squares on
    the logarithms (keys: keys_attended): -1 is pure dilution, 0 a share that holds."""
    share = torch.as_tensor(share, dtype=torch.float64)
    if len(share) < 2 or not (share > 0).all():
        raise ValueError("the fit needs two or more generated tokens and shares above 0")
    x = keys_attended(prompt_tokens, len(share)).log()
    y = share.log()
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x * x).sum())


def summary(numbers):
    """One row per third of the decoder: its layers, the share at the first and last generated
    token, what dilution predicts at the last, and the fitted exponent."""
    share = torch.tensor(numbers["image_share"], dtype=torch.float64)       # (N, L)
    n, layers = share.shape
    grouped = layer_groups(share)                                          # (N, 3)
    spans = torch.arange(layers).tensor_split(3)
    rows = []
    for name, span, column in zip(("early", "middle", "late"), spans, grouped.T):
        rows.append({"group": name, "layers": f"{int(span[0])}-{int(span[-1])}",
                     "first": float(column[0]), "last": float(column[-1]),
                     "dilution_last": float(dilution(column[0], numbers["prompt_tokens"], n)[-1]),
                     "exponent": decay_exponent(column, numbers["prompt_tokens"])})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description="The image's share of attention against length, "
                                                 "from generate.py --report's report.json.")
    parser.add_argument("report", help="report.json written by generate.py --report")
    path = parser.parse_args(argv).report
    try:
        with open(path) as f:
            numbers = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: cannot read {path}: {e}", file=sys.stderr)
        return 2
    n = len(numbers["image_share"])
    print(f"{numbers['image_tokens']} image tokens in a prompt of {numbers['prompt_tokens']}; "
          f"{n} generated tokens")
    if not numbers["image_tokens"] or n < 2:
        print("nothing to fit: the report needs an image and two or more generated tokens")
        return 0
    print(f"{'group':8} {'layers':8} {'share, token 1':>15} {f'token {n}':>10} "
          f"{'dilution':>10} {'exponent':>9}")
    for row in summary(numbers):
        print(f"{row['group']:8} {row['layers']:8} {row['first']:15.4f} {row['last']:10.4f} "
              f"{row['dilution_last']:10.4f} {row['exponent']:9.2f}")
    print("exponent: share ~ keys^a fitted over the answer; -1 is dilution by length alone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
