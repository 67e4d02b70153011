"""lm-evaluation-harness model `dsv3`: run any lm-eval task on a dsv3 checkpoint (needs `dsv3[lm-eval]`).

    python -m dsv3.eval.lm_eval_adapter run --model dsv3 --model_args checkpoint=runs/demo --tasks hellaswag

    import lm_eval
    import dsv3.eval.lm_eval_adapter  # registers "dsv3" with lm-eval
    lm_eval.simple_evaluate(model="dsv3", model_args="checkpoint=runs/demo,dtype=bfloat16", tasks=["piqa"])

model_args: checkpoint=DIR (or hf=DIR for a transformers model), which=best|last, tokenizer, device,
dtype, max_length, batch_size, batch_tokens, seed. The adapter is a thin translation: every
request goes to the same `CausalLM` that `dsv3 eval` uses, so both report the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:
    raise ImportError("the lm-evaluation-harness adapter needs lm-eval: pip install 'dsv3[lm-eval]'") from e

from dsv3.config import ConfigError
from dsv3.eval.backends import load_checkpoint, load_transformers
from dsv3.eval.lm import GenerationRequest, LanguageModel, LoglikelihoodRequest

__all__ = ["DSV3LM"]

DEFAULT_MAX_GEN_TOKS = 256


def _int(value, default: int) -> int:
    """lm-eval passes batch_size as an int or a string ("8", "auto")."""
    return int(value) if str(value).isdigit() else default


@register_model("dsv3")
class DSV3LM(LM):
    def __init__(
        self,
        checkpoint: str | None = None,
        hf: str | None = None,
        which: str = "best",
        tokenizer: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        max_length: int | None = None,
        batch_size: int | str = 64,
        batch_tokens: int = 32768,
        seed: int = 0,
        lm: LanguageModel | None = None,
        **ignored,  # lm-eval's own extras (max_batch_size, ...)
    ) -> None:
        super().__init__()
        if lm is None:
            batching = dict(batch_size=_int(batch_size, 64), batch_tokens=int(batch_tokens))
            max_length = int(max_length) if max_length else None
            if checkpoint and not hf:
                lm = load_checkpoint(
                    checkpoint,
                    which,
                    tokenizer=tokenizer,
                    device=device,
                    dtype=dtype,
                    max_length=max_length,
                    **batching,
                )
            elif hf and not checkpoint:
                lm = load_transformers(hf, device=device, dtype=dtype, max_length=max_length, **batching)
            else:
                raise ConfigError(
                    "model_args: give checkpoint=DIR (a dsv3 checkpoint) or hf=DIR, one of them"
                )
        self.lm, self.seed = lm, int(seed)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = self.lm.loglikelihood([LoglikelihoodRequest(*r.args) for r in requests])
        return [(r.logprob, r.is_greedy) for r in results]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self.lm.loglikelihood_rolling([r.args[0] for r in requests])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return self.lm.generate([generation_request(*r.args) for r in requests], seed=self.seed)


def generation_request(context: str, kwargs: dict) -> GenerationRequest:
    """lm-eval's (context, gen_kwargs): until, max_gen_toks, do_sample, temperature, top_p."""
    until: str | Sequence[str] = kwargs.get("until") or ()
    stop = (until,) if isinstance(until, str) else tuple(until)
    sampling = bool(kwargs.get("do_sample", False)) and float(kwargs.get("temperature") or 0) > 0
    return GenerationRequest(
        context,
        int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)),
        stop,
        float(kwargs["temperature"]) if sampling else 0.0,
        float(kwargs.get("top_p") or 1.0) if sampling else 1.0,
    )


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
