"""bench.py runs end to end on the CPU: a training step and a GRPO step, each a table row, and one
GRPO step against TRL's GRPOTrainer; its timings are never a test assertion. TRL and grpo.py fed
the same answers give the same gradient."""
import subprocess
import sys
from pathlib import Path

from processor import load_tokenizer

REPO = Path(__file__).resolve().parent.parent


def test_the_training_grpo_and_trl_benchmarks_run():
    out = subprocess.run([sys.executable, "bench.py", "--sizes", "--train-sizes", "110m",
                          "--grpo-sizes", "tiny", "--runs", "1", "--threads", "1",
                          "--train-tokens", "300", "--new-tokens", "8", "--grpo-samples", "2",
                          "--trl-sizes", "tiny", "--trl-prompts", "1", "--trl-steps", "2"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert any(row.startswith("| 110m, PVM at [1, 2, 4] width 128 | off |") for row in rows), rows
    assert any(row.startswith("| 110m, PVM at [1, 2, 4] width 128 | on |") for row in rows), rows
    assert any(row.startswith("| tiny | 2 x 8 |") for row in rows), rows
    assert any(row.startswith("| tiny (20M) | 1 x 2 x 8 |") for row in rows), rows
    assert "same answers, same weights: N 16 ours, 16 TRL's" in out.stdout, out.stdout


def test_trl_and_grpo_py_give_the_same_loss_gradient_on_the_same_answers(tmp_path, one_thread):
    """TRL's GRPOTrainer (v1.0-v1.8, as the paper's script sets it up) and grpo.py fed the same
    hand-made answers on the same weights: two prompts x 4 answers of up to 4 tokens, some ended
    by <|im_end|> or <|endoftext|>, some cut at the limit. TRL's own preparation gives the masks,
    N and the advantages; its loss -sum_i A_i n_i / N (its ratio p / p_old is 1: n_i the row's
    tokens in the loss, 0 for a cut one) and ours -sum A log p / N differ by a constant, so their
    gradients must be equal, to float32 rounding."""
    import bench

    path = bench.trl_checkpoint("tiny", tmp_path / "model")
    messages, rows = bench.builtin_prompts(2)
    G = 4
    trainer = bench.trl_trainer(path, rows, G, 4, tmp_path / "trl", steps=1)
    policy = bench.our_policy(path)
    END, TEXT_END = 151645, 151643  # <|im_end|>, <|endoftext|>
    answers = [[11, 12, END], [13, 14, 15, 16], [17, TEXT_END], [18, 19, 20, 21],
               [30, END], [31, 32, 33, 34], [35, 36, 37, END], [39, 40, 41, 42]]
    same = bench.same_completions(trainer, policy, load_tokenizer(path), messages, rows, G,
                                  answers)

    N = 3 + 4 + 2 + 4 + 2 + 4 + 4 + 4  # every answer's tokens, the cut ones too
    assert same["count"] == N and same["inputs"]["num_items_in_batch"].item() == N
    ended = [len(a) if a[-1] in (END, TEXT_END) else 0 for a in answers]  # n_i
    loss = 0.0
    for g in range(2):  # the advantages written out: Bessel's std, + 1e-4
        rewards = [a[0] % 3 for a in answers[g * G:(g + 1) * G]]     # bench.varied_reward
        mean = sum(rewards) / G
        std = (sum((r - mean) ** 2 for r in rewards) / (G - 1)) ** 0.5
        for i, r in enumerate(rewards):
            advantage = (r - mean) / (std + 1e-4)
            assert abs(same["inputs"]["advantages"][g * G + i].item() - advantage) < 1e-6
            loss -= advantage * ended[g * G + i] / N
    assert abs(same["loss"] - loss) < 1e-6
    assert len(same["grads"]) == 47  # the language model's tensors, the vision tower frozen
    for name, (ours, theirs) in same["grads"].items():
        assert theirs.abs().max() > 0, name
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max(), name
