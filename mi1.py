"""
Multi-In-One (MI1, paper section 2 and appendix B.3): teach a one-step student the teacher's diffusion
trajectory by mapping trajectory points to its layers. Block l's hidden state, decoded into an image by
the student's own final layer, is pulled towards the teacher trajectory at time t_l:

    L_MI1 = sum_l loss(x(t_l), x_hat_l),   the last mapped layer being the output with t = 0 (plain target)

    python mi1.py --layers 3,6 --t 0.5,0                # Table 4, row (3, 6); 6-layer toy student
    python mi1.py --layers 2,4,6 --t 0.66,0.33,0        # Table 4, row (2, 4, 6)
    python mi1.py --d 6 --w 128 --layers 3,6 --t 0.5,0 --data PATH/EDM-Cond-CIFAR   # real pairs, LPIPS

The targets come from the stored pair (z, x0) through the forward PF-ODE (DESIGN.md's "Multi-In-One's trajectory"
says why the paper's printed time direction and sigma_min are changed): eps = z - x0/80,
sigma(t) = (s^(1/7) + t (80^(1/7) - s^(1/7)))^7 with s = --sigma-min (0.002, where the teacher's sampler ended),
x(t) = (x0 + sigma(t) eps) / sqrt(1 + sigma(t)^2), x(0) = x0. So t = 0 is the image and t = 1 the scaled noise
80 z / sqrt(1 + 80^2). All other flags are distill.py's; checkpoints are distill.py's format (sample.py and fid.py
read them).
"""
import common
import distill
import toy
from common import UsageError, check_number


def trajectory_point(z, x0, t, sigma_min=toy.SIGMA_MIN):
    """x(t) on the teacher's PF-ODE trajectory through (z, x0), in the variance-preserving scaling
    x(t) = sqrt(alpha) x0 + sqrt(1 - alpha) eps with alpha = 1/(1 + sigma^2). z, x0: [B,3,32,32]."""
    if t == 0:
        return x0  # the image itself (sigma(0) = sigma_min would leave a trace of noise)
    eps = z - x0 / toy.SIGMA_MAX  # inverts x(1) = (x0 + 80 eps)/sqrt(1 + 80^2) = 80 z/sqrt(1 + 80^2)
    s = toy.rho_schedule(t, sigma_min)
    return (x0 + s * eps) / (1 + s * s) ** 0.5


def parse_mapping(args):
    """--layers/--t -> [(layer, t)], checked against the student's depth; raises UsageError."""
    layers = common.parse_numbers(args.layers, "--layers", int, "3,6")
    times = common.parse_numbers(args.times, "--t", float, "0.5,0")
    if len(layers) != len(times):
        raise UsageError(f"--layers has {len(layers)} entries but --t has {len(times)}: give one time "
                         f"per mapped layer.")
    if layers[-1] != args.depth:
        raise UsageError(f"--layers {args.layers}: the last mapped layer must be the final block "
                         f"{args.depth} of this {args.depth}-block student (it carries the plain "
                         f"target); use --d {layers[-1]} or end --layers with {args.depth}.")
    common.check_blocks(layers, args.depth, "--layers")
    if any(not 0 <= t <= 1 for t in times):
        raise UsageError(f"--t {args.times}: every time must lie in [0, 1] (1: noise, 0: image).")
    if times[-1] != 0:
        raise UsageError(f"--t {args.times}: the last time must be 0, the image target of the final "
                         f"layer.")
    check_number(args.sigma_min, "--sigma-min", low=0, high=toy.SIGMA_MAX / 2, low_open=True)
    return list(zip(layers, times))


class MultiInOne(distill.Method):
    """The intermediate terms of L_MI1; the final layer's t = 0 term is distill.py's plain loss.
    Has no weights of its own: x_hat_l decodes hidden[l-1] with the student's own final layer."""
    name, title = "mi1", "Multi-In-One (paper appendix B.3, Table 4)"
    default_design = (6, 64, 8)  # Table 4's student has 6 layers; the width is the toy default's (not given)
    needs_hidden = True
    config_keys = ("layers", "times", "sigma_min")

    @staticmethod
    def add_flags(g):
        g.add_argument("--layers", default="3,6", help="student blocks (1-based, increasing) that get a "
                       "trajectory target; the last must be the final block")
        g.add_argument("--t", dest="times", default="0.5,0", help="trajectory time per mapped layer, in [0,1] "
                       "(1: noise, 0: image); the last must be 0")
        g.add_argument("--sigma-min", type=float, default=toy.SIGMA_MIN, help="noise level at t = 0+ of the "
                       "trajectory schedule: 0.002, where the VP teacher's sampler ended (the paper prints 0.02, "
                       "EDM's VE value)")

    check = staticmethod(parse_mapping)

    @classmethod
    def build(cls, args, device, loss_fn):
        return cls(parse_mapping(args), loss_fn, args.sigma_min)

    def __init__(self, mapping, loss_fn, sigma_min=toy.SIGMA_MIN):
        super().__init__()
        self.mapping, self.loss_fn, self.sigma_min = mapping[:-1], loss_fn, sigma_min

    def forward(self, model, z, y, x, pred, hidden):
        total, terms = 0.0, {}
        for layer, t in self.mapping:
            x_hat = model.decode(hidden[layer - 1], y).float()  # [B,3,32,32] from block `layer`'s tokens
            term = self.loss_fn(x_hat, trajectory_point(z, x, t, self.sigma_min))
            total = total + term
            terms[f"l{layer}@t{t:g}"] = term.detach()
        return total, terms


def get_parser():
    return distill.get_parser(MultiInOne)


def main(argv=None):
    return distill.main(argv, MultiInOne)


if __name__ == "__main__":
    main()
