"""Vector GPTQ vs the importance-weighted fit on tests/test_vector_gptq.py's synthetic problem (docs/BENCHMARKS.md,
"Vector GPTQ on the lattice i-quants"): per lattice type, the loss ½tr(E(H+λI)Eᵀ) of solve() over the codec's fit with
the same importance diag(H + λI), on a correlated H (64 rows x 512, 2048 samples) and on a diagonal one.

    python scripts/vector_gptq_synth.py IQ3_XXS IQ3_S IQ2_XXS IQ2_XS IQ2_S IQ1_S
"""
import sys, time, numpy as np, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
from test_gptq_solver import problem, obs_loss
from edgequant.convert.codecs import codec
from edgequant.gptq import solve
torch.set_num_threads(1)
rng = np.random.default_rng(3)
Wd = (0.05 * rng.standard_normal((64, 512))).astype(np.float32)
Hd = np.diag(rng.lognormal(0, 0.5, 512) * 100).astype(np.float32)
for name in sys.argv[1:]:
    c = codec(name)
    W, X, H = problem(0, rows=64, cols=512, n=2048)
    r = []
    for W_, H_ in ((W, H), (Wd, Hd)):
        lam = 0.01*np.diagonal(H_).mean()
        base = c.dequantize(c.fit(W_, (np.diagonal(H_) + lam).astype(np.float32)))
        t = time.process_time(); sol = solve(W_, H_, c, refine=0); dt = time.process_time() - t
        r.append(f"{obs_loss(W_, sol.w_hat.numpy(), H_, 0.01)/obs_loss(W_, base, H_, 0.01):.3f} ({dt:.1f} cpu-s)")
    lam = 0.01 * np.diagonal(H).mean()
    base = obs_loss(W, c.dequantize(c.fit(W, (np.diagonal(H) + lam).astype(np.float32))), H, 0.01)
    refined = [f"{obs_loss(W, solve(W, H, c, refine=k).w_hat.numpy(), H, 0.01) / base:.3f}" for k in (1, 2, 4)]
    print(name, "correlated", r[0], "diagonal", r[1], "refine 1/2/4", " ".join(refined), flush=True)
