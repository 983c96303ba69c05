"""
Teaching Assistant (TA, paper section 2 and appendix B.2): a bigger DiT, distilled first like any
student, then run online and frozen while a small student learns from the teacher, the TA and the TA's
features (paper, eq. in B.2):

    L = l0 loss(x, x_hat) + l1 loss(x_TA, x_hat) + l2 sum_l loss(x_TA_l, x_hat_l)

x_TA_l and x_hat_l are the TA's and the student's hidden states at mapped blocks (the penultimate ones,
after Muralidharan et al. 2024), the student's first widened to the TA's width by a learned linear
"expansion", both decoded into images through the TA's final layer. The expansion is trained and
checkpointed with the student. Table 3's rows (l0, l1, l2):

    python distill.py --d 12 --w 384 --h 12 --data PATH --out runs/ta     # 1. train the TA (paper's design)
    python ta.py --ta runs/ta/ckpt.pt --data PATH                          # TA only          (0, 1, 0)
    python ta.py --ta runs/ta/ckpt.pt --data PATH --feature-weight 1       # TA + features    (0, 1, 1)
    python ta.py --ta runs/ta/ckpt.pt --data PATH --teacher-weight 1 --feature-weight 1   # all (1, 1, 1)

The baseline row (1, 0, 0) is plain distill.py. All other flags are distill.py's; the TA uses its EMA
weights and the student's loss (--loss). Checkpoints are distill.py's format (sample.py, fid.py read them).
"""
import torch
import torch.nn as nn

import common
import distill
import sample
from common import UsageError, check_number


def parse_feature_layers(text, student_depth, ta_depth):
    """'penultimate' or 's:t,...' -> [(student block, TA block)], increasing in both; raises UsageError."""
    if text == "penultimate":
        text = f"{student_depth - 1}:{ta_depth - 1}"
    pairs = [common.parse_numbers(pair, "--feature-layers", int, "2:4,4:11", ":") for pair in text.split(",")]
    if any(len(pair) != 2 for pair in pairs):
        raise UsageError(f"--feature-layers {text}: expected student:TA block pairs such as 2:4,4:11.")
    common.check_blocks([s for s, _ in pairs], student_depth, "--feature-layers")
    common.check_blocks([t for _, t in pairs], ta_depth, "--feature-layers", "the TA")
    return [tuple(pair) for pair in pairs]


def load_ta(path, device):
    ta, cfg = sample.load_model(path, device, weights="ema", flag="--ta")
    return ta.requires_grad_(False), cfg


class TeachingAssistant(distill.Method):
    """The l1 and l2 terms. The TA is held outside the module tree (a plain attribute set through
    object.__setattr__) so that it is neither trained nor saved in every student checkpoint; only the
    expansions are weights of this module."""
    name, title = "ta", "Teaching Assistant (paper appendix B.2, Table 3)"
    config_keys = ("ta_design", "teacher_weight", "ta_weight", "feature_weight", "feature_layers")

    @staticmethod
    def add_flags(g):
        g.add_argument("--ta", help="the TA's checkpoint (distill.py's ckpt.pt; the paper's TA is (12,384,12))")
        g.add_argument("--teacher-weight", type=float, default=0.0, help="l0: loss(x, x_hat) against the teacher")
        g.add_argument("--ta-weight", type=float, default=1.0, help="l1: loss(x_TA, x_hat) against the TA's output")
        g.add_argument("--feature-weight", type=float, default=0.0, help="l2: the feature terms")
        g.add_argument("--feature-layers", default="penultimate", help="student:TA block pairs (1-based), e.g. "
                       "4:11 or 2:4,4:11; 'penultimate' pairs the two penultimate blocks (the paper)")

    @staticmethod
    def check(args):
        if not args.ta:
            raise UsageError("ta.py needs --ta CKPT, the TA's checkpoint: train it first with distill.py "
                             "(e.g. python distill.py --d 12 --w 384 --h 12 --out runs/ta).")
        weights = (args.teacher_weight, args.ta_weight, args.feature_weight)
        for value, flag in zip(weights, ("--teacher-weight", "--ta-weight", "--feature-weight")):
            check_number(value, flag, low=0)
        if max(weights) == 0:
            raise UsageError(f"--teacher-weight/--ta-weight/--feature-weight are {weights}: they must be "
                             f">= 0 and not all 0.")

    @classmethod
    def build(cls, args, device, loss_fn):
        ta, ta_cfg = load_ta(args.ta, device)
        args.ta_design = [ta_cfg["depth"], ta_cfg["width"], ta_cfg["heads"]]  # recorded in the config
        pairs = parse_feature_layers(args.feature_layers, args.depth, ta.depth) if args.feature_weight else []
        print(f"TA {args.ta}: design {tuple(args.ta_design)}, {ta_cfg.get('param_count', '?')} parameters; "
              f"feature pairs (student:TA) {pairs or 'none'}")
        return cls(ta, args.width, pairs, (args.teacher_weight, args.ta_weight, args.feature_weight), loss_fn)

    def __init__(self, ta, student_width, pairs, weights, loss_fn):
        super().__init__()
        object.__setattr__(self, "ta", ta)  # frozen, eval mode, on the run's device
        self.base_weight, self.ta_weight, self.feature_weight = weights
        self.pairs, self.loss_fn = pairs, loss_fn
        self.needs_hidden = self.feature_weight > 0
        # one expansion per mapped pair: student width -> TA width (the paper's "expansion tensor")
        self.expand = nn.ModuleList(nn.Linear(student_width, ta.width) for _ in pairs) if self.needs_hidden \
            else nn.ModuleList()

    def forward(self, model, z, y, x, pred, hidden):
        with torch.no_grad():  # the TA is a fixed target: no graph, no gradient
            x_ta, ta_hidden = self.ta(z, y, return_hidden=True)
            ta_feats = [self.ta.decode(ta_hidden[t - 1], y).float() for _, t in self.pairs] \
                if self.needs_hidden else []
        total, terms = 0.0, {}
        if self.ta_weight:
            terms["ta"] = self.loss_fn(pred.float(), x_ta.float())
            total = self.ta_weight * terms["ta"]
        for (s, t), expand, target in zip(self.pairs, self.expand, ta_feats):
            # student block s tokens [B,256,w_s] -> [B,256,w_TA] -> TA's final layer -> [B,3,32,32]
            feat = self.ta.decode(expand(hidden[s - 1]), y).float()
            terms[f"feat{s}:{t}"] = self.loss_fn(feat, target)
            total = total + self.feature_weight * terms[f"feat{s}:{t}"]
        return total, {k: v.detach() for k, v in terms.items()}


def get_parser():
    return distill.get_parser(TeachingAssistant)


def main(argv=None):
    return distill.main(argv, TeachingAssistant)


if __name__ == "__main__":
    main()
