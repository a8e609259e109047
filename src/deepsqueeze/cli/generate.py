"""``deepsqueeze generate MODEL --prompt TEXT``: continue a prompt with a causal LM (KV cache, batch 1)."""

from __future__ import annotations

from pathlib import Path

import typer

from deepsqueeze.cli._common import (
    BackendOption,
    DataOption,
    DeviceOption,
    JsonOption,
    ModelCodeOption,
    ModelOption,
    PreferOption,
    ThreadsOption,
    WeightsOption,
    emit_json,
    model_ref,
    on_backend,
    stdout,
    use_prefer,
    use_threads,
)

MAX_PROMPT_BYTES = 1 << 20


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    from deepsqueeze.errors import DataError

    if (prompt is None) == (prompt_file is None):
        raise DataError("give the prompt once: --prompt TEXT or --prompt-file FILE")
    if prompt is not None:
        return prompt
    assert prompt_file is not None
    try:
        if prompt_file.stat().st_size > MAX_PROMPT_BYTES:
            raise DataError(f"{prompt_file} is over {MAX_PROMPT_BYTES:,} bytes: a prompt file holds one prompt")
        return prompt_file.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"prompt file {prompt_file} does not exist") from None
    except UnicodeDecodeError:
        raise DataError(f"{prompt_file} is not UTF-8 text: save the prompt as UTF-8") from None
    except OSError as exc:
        raise DataError(f"cannot read {prompt_file}: {exc.strerror}") from None


def register(app: typer.Typer) -> None:
    @app.command()
    def generate(
        model_arg: str = typer.Argument(None, metavar="[MODEL]", help="A causal LM: FILE.dsq, zoo:smollm2-135m, "
                                        "gguf:FILE, hf:DIR (or --model)"),
        prompt: str = typer.Option(None, "--prompt", help="The text to continue"),
        prompt_file: Path = typer.Option(None, "--prompt-file", help="A UTF-8 file holding the prompt"),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="At most this many new tokens "
                                           "(1..the model's context)"),
        temperature: float = typer.Option(0.0, "--temperature", help="0: greedy; above: sample from "
                                          "softmax(logits / T)"),
        seed: int = typer.Option(0, "--seed", help="Sampling seed (same seed, same tokens)"),
        chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template"),
        no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the whole sequence per token (the "
                                      "reference the KV cache must equal)"),
        ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Go on past an end-of-sequence token (speed "
                                        "measurements of a fixed length)"),
        backend: str = BackendOption,
        model: str = ModelOption,
        weights: str = WeightsOption,
        model_code: str = ModelCodeOption,
        data: str = DataOption,
        device: str = DeviceOption,
        threads: int = ThreadsOption,
        prefer: str = PreferOption,
        as_json: bool = JsonOption,
    ) -> None:
        """Continue a prompt with a causal LM, with a KV cache; prints the text and prompt / decode tokens/s."""
        from deepsqueeze.resolve import resolve_model

        model = model_ref(model_arg, model)
        text = _read_prompt(prompt, prompt_file)
        threads = use_threads(threads)
        use_prefer(prefer)
        m = resolve_model(model, weights=weights, progress=not as_json, model_code=model_code, device=device)
        from deepsqueeze.data import resolve_data

        # --data: the sentences the ONNX export (--backend ort) is checked on
        m = on_backend(m, backend, threads, resolve_data(data, split="eval") if data else None)
        result = m.generate(text, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, chat=chat,
                            cache=not no_cache, ignore_eos=ignore_eos)
        if as_json:
            emit_json({"model": model, "backend": backend, **result.to_dict()})
            return
        stdout.print(result.text, markup=False, highlight=False)
        speed = result.decode_tokens_per_s
        stdout.print(f"[dim]{result.prompt_tokens} prompt tokens at {result.prompt_tokens_per_s:.1f} tok/s, "
                     f"{len(result.token_ids)} new tokens" + (f" at {speed:.1f} tok/s" if speed else "")
                     + f" (stopped: {result.stopped}{'' if result.cache else ', no cache'})[/dim]")
