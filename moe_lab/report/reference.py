"""What the papers report, as data: the reference numbers `moe-lab report` prints beside ours.

Transcribed from ../shared/PAPERS.md (itself from the papers); each entry cites its table or figure.
ST-MoE and Switch "quality" is negative log perplexity (higher is better); StableMoE reports perplexity.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Reference:
    """One study's source in the papers: where, what it found, and its numbers keyed like our rows."""

    source: str
    finding: str
    # row label -> column label -> the paper's value (a number or a short text); numeric row labels are
    # written as f"{value:g}" (1.0 -> "1")
    numbers: dict[str, dict[str, float | str]] = field(default_factory=dict)
    note: str = ""


REFERENCES: dict[str, Reference] = {
    "z-loss-stability": Reference(
        source="ST-MoE Tables 2-4 (baseline 6 seeds, others 3); Switch Table 2",
        finding="z-loss removes instability at no quality cost; jitter and update clipping stabilise but cost "
        "quality; a bf16 router is less stable than an fp32 one",
        numbers={
            "baseline": {"stable": "4/6", "quality": -1.755},
            "z-loss": {"stable": "3/3", "quality": -1.741},
            "jitter": {"stable": "3/3", "quality": -1.777},
            "update-clip": {"stable": "3/3", "quality": -4.206},
            "fp32-router": {"stable": "stable (Switch)", "quality": -1.716},
        },
        note="Switch Table 2: a bfloat16 router diverged (-3.780); float32 router -1.718.",
    ),
    "capacity-factor": Reference(
        source="ST-MoE Table 8 (top-2, 32 experts; train CF / eval CF -> quality)",
        finding="higher CF is better; raising only the eval CF helps for free",
        numbers={
            "0.75": {"eval 0.75": -1.424, "eval 2.0": -1.402},
            "1": {"eval 1.0": -1.392, "eval 2.0": -1.378},
            "1.25": {"eval 1.25": -1.375, "eval 2.0": -1.369},
            "2": {"eval 2.0": -1.360, "eval 3.0": -1.359},
        },
    ),
    "top-k": Reference(
        source="ST-MoE Table 8 (train/eval CF 1.25/2.0); Switch Table 1",
        finding="top-(n+1) routing is slightly better than top-n at the same capacity factor",
        numbers={"1": {"quality": -1.373}, "2": {"quality": -1.369}, "3": {"quality": -1.356}},
        note="top-3 in ST-MoE is at CF 2.0/3.0; top-4 has no paper number.",
    ),
    "finetune-grid": Reference(
        source="ST-MoE Table 20 (SuperGLUE score; batch in tokens 1M / 262k / 65k)",
        finding="sparse models prefer smaller batches and higher learning rates; dense nearly the opposite",
        numbers={
            "dense 1e-3": {"1M": 84.8, "262k": 84.9, "65k": 83.7},
            "dense 5e-4": {"1M": 84.8, "262k": 84.9, "65k": 84.4},
            "dense 1e-4": {"1M": 84.0, "262k": 85.1, "65k": 84.9},
            "sparse 1e-3": {"1M": 86.9, "262k": 86.2, "65k": 85.8},
            "sparse 5e-4": {"1M": 86.1, "262k": 85.5, "65k": 86.5},
            "sparse 1e-4": {"1M": 84.3, "262k": 85.1, "65k": 85.6},
        },
    ),
    "token-drop": Reference(
        source="ST-MoE Table 5 (aux loss on; train/eval CF: % dropped, SuperGLUE)",
        finding="dropping 10-15% of tokens in fine-tuning costs about nothing",
        numbers={
            "0.75": {"dropped": "10.6%", "score": 86.5},
            "1.25": {"dropped": "0.3%", "score": 86.7},
            "2": {"dropped": "0%", "score": 85.8},
            "4": {"dropped": "0%", "score": 86.4},
        },
    ),
    "aux-loss-finetune": Reference(
        source="ST-MoE Table 5 (train/eval CF: % dropped, SuperGLUE)",
        finding="keeping the aux loss in fine-tuning helps slightly (fewer drops)",
        numbers={
            "on 0.75": {"dropped": "10.6%", "score": 86.5},
            "off 0.75": {"dropped": "15.6%", "score": 85.7},
            "on 1.25": {"dropped": "0.3%", "score": 86.7},
            "off 1.25": {"dropped": "2.9%", "score": 85.8},
        },
    ),
    "freeze": Reference(
        source="ST-MoE Fig. 5 (values only in the figure)",
        finding="all, non-MoE and attention about equal; FFN-only slightly best; MoE-only clearly worst",
    ),
    "overfit": Reference(
        source="ST-MoE Fig. 3 (CB 250 examples; ReCoRD 138k)",
        finding="the sparse model overfits the small task (train accuracy up, validation worse than dense) and "
        "wins the large one",
    ),
    "router-fluctuation": Reference(
        source="StableMoE Table 2 (base: valid / test PPL) and Fig. 2 (BASE fluctuation)",
        finding="learned routers keep changing their minds late in training; StableMoE's stage 2 never does; "
        "StableMoE has the best perplexity",
        numbers={
            "switch": {"valid ppl": 19.79},
            "base": {"valid ppl": 20.04, "still changing after 20/50/80%": "40.9% / 29.1% / 15.4%"},
            "hash": {"valid ppl": 19.63},
            "stablemoe": {"valid ppl": 19.28, "still changing after 20/50/80%": "0 in stage 2"},
        },
        note="Dense 23.02. Top-2 is not in StableMoE's table.",
    ),
    "stablemoe": Reference(
        source="StableMoE Table 6 (stage-1 length) and Table 5 (stage 1 only)",
        finding="a short stage 1 (10%) is best; stage 2 (frozen distilled routing) beats stage 1 alone",
        numbers={
            "0.1": {"valid ppl": 19.28},
            "0.25": {"valid ppl": 19.34},
            "0.5": {"valid ppl": 19.41},
            "1": {"valid ppl": 19.48},
        },
    ),
}
