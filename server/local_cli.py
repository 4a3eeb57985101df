"""`loraquilt run` (one-shot local generation) and `loraquilt info` (model memory figures).

`run` prints only the generated text on stdout; progress and logs go to stderr, so
scripts can capture the answer."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loraquilt.server.engine_args import add_engine_arguments


def add_run_parser(commands, name: str = "run", help_text: str = "generate once, locally") -> None:
    parser = commands.add_parser(name, help=help_text)
    parser.add_argument("prompt")
    add_engine_arguments(parser, ("model",))
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--adapter", metavar="DIR", help="PEFT LoRA folder")
    group.add_argument("--mix", metavar="DIR=W", nargs="+", action="extend",
                       help="weighted mix of PEFT LoRA folders, e.g. --mix a=0.5 b=0.5")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    add_engine_arguments(parser, ("device", "dtype"))
    parser.set_defaults(run=_run)


def add_info_parser(commands, name: str = "info", help_text: str = "NF4 model figures") -> None:
    parser = commands.add_parser(name, help=help_text)
    add_engine_arguments(parser, ("model",))
    parser.add_argument("--json", action="store_true", help="print JSON")
    add_engine_arguments(parser, ("device", "dtype"))
    parser.set_defaults(run=_info)


def _parse_mix(entries: list[str]) -> list[tuple[Path, float]]:
    mix = []
    for entry in entries:
        path, sep, weight = entry.rpartition("=")
        if not sep or not path:
            raise SystemExit(f"--mix entries look like DIR=WEIGHT, got {entry!r}")
        try:
            mix.append((Path(path), float(weight)))
        except ValueError:
            raise SystemExit(f"--mix weight in {entry!r} is not a number") from None
    return mix


def _run(args: argparse.Namespace) -> int:
    from loraquilt.server.adapters.peft_folder import AdapterError, read_adapter_config
    from loraquilt.server.engine import Engine
    from loraquilt.server.engine_args import engine_config_from_args
    from loraquilt.server.request import Request, RequestError, SamplingParams

    mix = _parse_mix(args.mix) if args.mix else ([(Path(args.adapter), 1.0)] if args.adapter else [])
    try:
        ranks = [read_adapter_config(path, max_rank=1 << 16).get("r", 8) for path, _ in mix]
        sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    except (AdapterError, RequestError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    engine = Engine(engine_config_from_args(
        args, max_batch_size=1, max_active_adapters=max(1, len(mix)), max_cpu_adapters=max(1, len(mix)),
        max_lora_rank=max([16, *ranks]),
    ))
    names = []
    try:
        for index, (path, _) in enumerate(mix):
            name = f"{index}:{path.name}"
            engine.register_adapter(name, path)
            names.append(name)
        request = Request(prompt=args.prompt, chat=args.chat, sampling=sampling,
                          mix=tuple(zip(names, (w for _, w in mix))))
        (result,) = engine.generate([request])
    except (AdapterError, RequestError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(result.text + "\n")
    print(f"[{result.completion_tokens} tokens, finish: {result.finish_reason}]", file=sys.stderr)
    return 0


def model_info(model, name: str) -> dict:
    config = model.config
    quantized = model.quantized_bytes()
    params = model.quantized_params()
    return {
        "model": name,
        "architecture": config.model_type,
        "layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "parameters": model.num_params(),
        "quantized_parameters": params,
        "quantized_bytes": quantized,
        "quantized_bytes_per_param": quantized / params,
        "dense_bytes": model.dense_bytes(),
        "total_bytes": quantized + model.dense_bytes(),
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "dtype_reason": model.dtype_reason,
    }


def _info(args: argparse.Namespace) -> int:
    from loraquilt.server.config_flags import config_from_values
    from loraquilt.server.model.sources import resolve_model
    from loraquilt.server.model.weights import DeviceConfig, load_causal_lm

    source = resolve_model(args.model)
    model = load_causal_lm(source.folder, config_from_values(DeviceConfig, vars(args)))
    info = model_info(model, source.name)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"model          {info['model']} ({info['architecture']}, {info['layers']} layers)")
        print(f"parameters     {info['parameters']:,} ({info['quantized_parameters']:,} in NF4 projections)")
        print(f"NF4 weights    {info['quantized_bytes'] / 2**20:.1f} MiB = "
              f"{info['quantized_bytes_per_param']:.3f} bytes/param")
        print(f"dense          {info['dense_bytes'] / 2**20:.1f} MiB ({info['dtype']}: embeddings, norms, lm_head)")
        print(f"device         {info['device']}")
        print(f"compute dtype  {info['dtype']} ({info['dtype_reason']})")
    return 0
