"""`loraserve merge`: bake an adapter into its base model, for engines that cannot apply it.

Where another engine drops part of an adapter (embed_tokens / lm_head LoRA, modules_to_save, DoRA,
trainable tokens, bias), the one fix that always works is a plain model with the adapter inside.
PEFT's `merge_and_unload` is exact for every option loraserve accepts but one: on a model with tied
input/output embeddings, merging a change to one of them writes into the weight both share, so the
other changes too. We untie such models first and save both matrices.

A merge is only as good as its proof: the written directory is loaded back from disk and its logits
compared with PeftModel's on probe prompts; over the tolerance, the command fails."""

import argparse
import shutil
import sys
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from loraserve.lora.adapter import AdapterError, load_adapter, served_modules
from loraserve.model.loader import DTYPES
from loraserve.tools.common import EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, UsageError, adapter_dir, emit
from loraserve.tools.oracle import load_base, load_peft, logits_of, probe_inputs

# PEFT is the oracle (DESIGN.md): float32 logits must agree to 1e-4, or, on real models whose logits
# reach tens, to 1e-5 of the largest logit: a merged W + sBA rounds differently from Wx + sB(Ax) and
# float32 carries about seven significant digits through every layer.
FLOAT32_TOLERANCE = 1e-4
FLOAT32_RELATIVE_TOLERANCE = 1e-5


def run(args: argparse.Namespace) -> int:
    try:
        result = merge(args.adapter, args.base, Path(args.out), args.dtype, args.tolerance)
    except UsageError as err:
        print(f"loraserve merge: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except AdapterError as err:
        emit({"ok": False, "error": str(err)}, args.json, f"cannot merge exactly: {err}")
        return EXIT_PROBLEM
    emit(result, args.json, _text(result))
    return EXIT_OK if result["ok"] else EXIT_PROBLEM


def merge(adapter: str, base: str, out: Path, dtype: str = "float32", tolerance: float | None = None) -> dict:
    """Merge, save, reload and compare; returns the measured result (`ok` false over tolerance).
    Raises UsageError for bad paths and AdapterError for an adapter loraserve cannot apply exactly."""
    adapter_dir(adapter)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"output {str(out)!r} exists and is not an empty directory")
    steps = tqdm(total=6, desc="merge", unit="step", file=sys.stderr)

    steps.set_postfix_str("loading base")
    model, tokenizer = load_base(base)
    steps.update()

    steps.set_postfix_str("checking adapter")
    checked = load_adapter("adapter", adapter, model)  # exact or refused, with loraserve's rules
    touches_embeddings = _embedding_names(model) & set(checked.modules)
    inputs = probe_inputs(tokenizer, model.config.get_text_config().vocab_size)
    steps.update()

    steps.set_postfix_str("PEFT reference")
    peft_model = load_peft(model, adapter)
    reference = logits_of(peft_model, inputs)
    steps.update()

    steps.set_postfix_str("merging")
    untied = bool(touches_embeddings) and _untie(peft_model.get_base_model())
    merged = peft_model.merge_and_unload()
    if untied:
        merged.config.get_text_config().tie_word_embeddings = False
        merged.config.tie_word_embeddings = False
    merge_diff = _max_diff(logits_of(merged, inputs), reference)
    steps.update()

    steps.set_postfix_str("saving")
    for param in merged.parameters():  # parameters only: buffers such as rotary inv_freq stay as loading makes them
        param.data = param.data.to(DTYPES[dtype])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    steps.update()

    steps.set_postfix_str("proving")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=DTYPES[dtype]).eval()
    saved, expected = reloaded.state_dict(), merged.state_dict()
    differing = sorted(k for k in expected if k not in saved or not torch.equal(saved[k], expected[k]))
    from_disk = logits_of(reloaded, inputs)
    saved_diff = _max_diff(from_disk, reference)
    steps.update()
    steps.close()

    scale = max(r.abs().max().item() for r in reference)
    limit = max(FLOAT32_TOLERANCE, FLOAT32_RELATIVE_TOLERANCE * scale) if tolerance is None else tolerance
    # Rounding to a half dtype moves logits by itself; there the files are held to holding exactly the
    # rounded merged weights, and their distance to PEFT is reported, not judged.
    ok = merge_diff <= limit and not differing and (dtype != "float32" or saved_diff <= limit)
    same_tokens = sum(int(torch.equal(g.argmax(-1), r.argmax(-1))) for g, r in zip(from_disk, reference))
    return {
        "ok": ok, "adapter": adapter, "base": base, "out": str(out), "dtype": dtype, "untied_embeddings": untied,
        "probes": len(inputs), "tolerance": limit, "merge_vs_peft_max_abs_diff": merge_diff,
        "saved_tensors_differing": differing, "saved_vs_peft_max_abs_diff": saved_diff,
        "probes_with_equal_greedy_tokens": same_tokens, "tokenizer_saved": tokenizer is not None,
    }


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _embedding_names(model: nn.Module) -> set[str]:
    """Served names of the input and output embedding modules."""
    wanted = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    return {name for name, m in served_modules(model).items() if id(m) in wanted}


def _holder(module: nn.Module) -> nn.Module:
    """The module that owns the base weight behind PEFT's wrappers (LoRA layers keep it as
    `base_layer`, ModulesToSaveWrapper as `original_module`)."""
    while True:
        if hasattr(module, "base_layer"):
            module = module.base_layer
        elif hasattr(module, "original_module"):
            module = module.original_module
        else:
            return module


def _untie(model: nn.Module) -> bool:
    """Give the output embedding its own copy of a weight it shares with the input embedding, so that
    merging a change into one leaves the other as PEFT computed it. Returns whether it was tied."""
    emb_in, emb_out = _holder(model.get_input_embeddings()), _holder(model.get_output_embeddings())
    if emb_out is None or emb_in.weight is not emb_out.weight:
        return False
    emb_out.weight = nn.Parameter(emb_in.weight.detach().clone(), requires_grad=False)
    return True


def _text(r: dict) -> str:
    verdict = "OK" if r["ok"] else "FAILED"
    lines = [f"{verdict}: merged {r['adapter']} into {r['base']} -> {r['out']} ({r['dtype']})",
             f"  max |logit difference| on {r['probes']} probe prompts (tolerance {r['tolerance']:.3g}):",
             f"    float32 merged model vs PeftModel: {r['merge_vs_peft_max_abs_diff']:.3g}",
             f"    saved files, loaded back in {r['dtype']}, vs PeftModel: {r['saved_vs_peft_max_abs_diff']:.3g}"
             + ("" if r["dtype"] == "float32" else " (rounding; not judged)"),
             f"  greedy tokens equal on {r['probes_with_equal_greedy_tokens']}/{r['probes']} probes"]
    if r["saved_tensors_differing"]:
        shown = ", ".join(r["saved_tensors_differing"][:8])
        lines.append(f"  saved tensors that differ from the merged model: {shown}")
    if r["untied_embeddings"]:
        lines.append("  the base ties input and output embeddings and the adapter changes them: saved untied")
    if not r["tokenizer_saved"]:
        lines.append("  the base has no tokenizer; none was written")
    if r["ok"]:
        lines.append(f"  serve it: loraserve serve {r['out']}")
    return "\n".join(lines)
