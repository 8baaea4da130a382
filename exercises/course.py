"""
The course: its exercises in order, each a list of functions of the project that the student
writes. Nothing in the runtime files marks them: `make.py` finds each function by its qualified
name with Python's `ast` and blanks its body in the student copy; `grade.py` runs each
exercise's tests; `mutants.py` (kept out of the student copy) holds wrong implementations that
each exercise's tests must catch.

Adding an exercise is adding an entry here, its test file under exercises/tests (marked
`pytest.mark.exNN`), its section in README.md and at least three mutants in mutants.py.
"""
from dataclasses import dataclass

HANDOUT = "exercises/README.md"


@dataclass(frozen=True)
class Exercise:
    number: int
    title: str
    points: int
    functions: tuple  # qualified names: module path from the project root, then class, function
    tests: str        # file under exercises/tests

    @property
    def marker(self):
        return f"ex{self.number:02d}"

    @property
    def message(self):
        """What a blanked function raises."""
        return f"exercise {self.number}: see {HANDOUT}"


EXERCISES = [
    Exercise(1, "RMSNorm and SwiGLU", 10,
             ("model.RMSNorm.forward", "model.MLP.forward"),
             "test_ex01_norm_mlp.py"),
    Exercise(2, "attention: GQA, q/k norm, RoPE", 15,
             ("vision.rotate_half", "vision.apply_rope", "model.Attention.qkv",
              "model.Attention.forward"),
             "test_ex02_attention.py"),
    Exercise(3, "interleaved multimodal RoPE", 15,
             ("model.rope_positions", "model.Qwen3VL.rotary"),
             "test_ex03_mrope.py"),
    Exercise(4, "image preprocessing", 10,
             ("vision.smart_resize", "vision.merge_window_order", "vision.preprocess_image"),
             "test_ex04_preprocess.py"),
    Exercise(5, "the vision tower's mergers and DeepStack", 10,
             ("vision.PatchMerger.forward", "vision.VisionTower.forward", "model.place_image"),
             "test_ex05_vision.py"),
    Exercise(6, "the decoding mask and sampling", 10,
             ("model.causal_mask", "generate.sample"),
             "test_ex06_mask_sampling.py"),
    Exercise(7, "the PVM block", 15,
             ("pvm.CrossAttention.forward", "pvm.PVMBlock.__init__", "pvm.PVMBlock.forward"),
             "test_ex07_pvm.py"),
    Exercise(8, "the SFT loss and the schedule", 10,
             ("train.AssistantLoss.forward", "train.get_lr"),
             "test_ex08_sft.py"),
    Exercise(9, "GRPO: group advantages and the policy objective", 10,
             ("grpo.group_advantages", "grpo.PolicyObjective.forward",
              "grpo.PolicyObjective.weighted_logp"),
             "test_ex09_grpo.py"),
    Exercise(10, "measuring visual attention dilution", 5,
             ("exercises.measure.layer_groups", "exercises.measure.dilution",
              "exercises.measure.decay_exponent"),
             "test_ex10_measure.py"),
]

BY_NUMBER = {exercise.number: exercise for exercise in EXERCISES}
