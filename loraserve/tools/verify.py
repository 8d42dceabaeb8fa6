"""`loraserve verify`: is this OpenAI-compatible server really applying the adapter?

The one symptom every silent LoRA failure shares is that the adapter answers like the base. So this
asks: are both names listed, and do the same prompts at temperature 0 get different answers from
adapter and base (containing `--expect` when given)? It works against any server (loraserve, vLLM,
others), and it imports nothing heavy, so a container HEALTHCHECK can run it every minute."""

import argparse
import json
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass

from loraserve.tools.common import EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, PROBE_PROMPTS, emit


class VerifyError(Exception):
    """The server could not be asked (down, unauthorised, not OpenAI-shaped); the message says which."""


@dataclass
class Client:
    url: str
    api_key: str | None
    timeout: float

    def request(self, path: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(self.url.rstrip("/") + path, method="POST" if body is not None else "GET",
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:300]
            if err.code == 401:
                raise VerifyError(f"{self.url} refused the API key (401): pass the server's key with --api-key") \
                    from None
            raise VerifyError(f"{path} answered HTTP {err.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            reason = getattr(err, "reason", err)
            raise VerifyError(f"server down: cannot reach {self.url} ({reason})") from None
        except json.JSONDecodeError:
            raise VerifyError(f"{path} did not answer JSON: is {self.url} an OpenAI-compatible server?") from None

    def answer(self, api: str, model: str, prompt: str, max_tokens: int) -> str:
        """The greedy answer to `prompt` (temperature 0, fixed seed)."""
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "seed": 0}
        if api == "chat":
            out = self.request("/v1/chat/completions", dict(body, messages=[{"role": "user", "content": prompt}]))
            return out["choices"][0]["message"]["content"] or ""
        out = self.request("/v1/completions", dict(body, prompt=prompt))
        return out["choices"][0]["text"]


def run(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        print("loraserve verify: error: --max-tokens must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    result = verify(Client(args.url, args.api_key, args.timeout), args.model, args.base,
                    args.prompt or list(PROBE_PROMPTS), args.expect or None, args.api, args.max_tokens)
    emit(result, args.json, _text(result))
    return EXIT_OK if result["ok"] else EXIT_PROBLEM


def verify(client: Client, adapter: str, base: str, prompts: list[str], expect: str | None = None,
           api: str = "chat", max_tokens: int = 32) -> dict:
    """Ask the server; returns {"ok", "reason", "answers", ...}. Never raises for a server problem: a
    server that cannot be asked is a failed check with its reason."""
    result = {"ok": False, "url": client.url, "adapter": adapter, "base": base, "expect": expect, "answers": []}
    try:
        listed = [m.get("id") for m in client.request("/v1/models").get("data", [])]
        result["listed"] = listed
        missing = [n for n in (adapter, base) if n not in listed]
        if missing:
            return dict(result, reason=f"not listed by /v1/models: {', '.join(map(repr, missing))} "
                                       f"(listed: {', '.join(map(str, listed)) or 'nothing'})")
        for prompt in prompts:
            result["answers"].append({"prompt": prompt,
                                      "base": client.answer(api, base, prompt, max_tokens),
                                      "adapter": client.answer(api, adapter, prompt, max_tokens)})
    except (VerifyError, KeyError, IndexError, TypeError, AttributeError) as err:
        reason = str(err) if isinstance(err, VerifyError) else f"unexpected answer shape ({err!r})"
        return dict(result, reason=reason)
    answers = result["answers"]
    if all(a["adapter"] == a["base"] for a in answers):
        return dict(result, reason=f"the adapter answers exactly like the base on all {len(answers)} prompt(s): "
                                   "it is not being applied (or changes nothing)")
    if expect is not None:
        without = [a["prompt"] for a in answers if expect not in a["adapter"]]
        if without:
            return dict(result, reason=f"the adapter's answer lacks {expect!r} for: "
                                       + "; ".join(map(repr, without)))
    same = sum(a["adapter"] == a["base"] for a in answers)
    return dict(result, ok=True, reason=f"the adapter's answers differ from the base's on "
                                         f"{len(answers) - same}/{len(answers)} prompt(s)"
                                         + (f" and contain {expect!r}" if expect is not None else ""))


def _text(r: dict) -> str:
    lines = [f"{'PASS' if r['ok'] else 'FAIL'}: {r['adapter']} vs {r['base']} at {r['url']}: {r['reason']}"]
    for a in r["answers"][:3]:
        lines += [f"  prompt:  {a['prompt']!r}", f"    base:    {a['base'][:100]!r}",
                  f"    adapter: {a['adapter'][:100]!r}"]
    return "\n".join(lines)
