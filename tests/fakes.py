"""Deterministic stand-ins for a chat model and judges, shared by test_synth.py and test_evaluate.py.

FakeChatModel answers according to the system prompt (complies under "uncensored"-style prompts, refuses
under "harmless"-style ones), recognises the critique and revision requests of cst.synth, and reacts to
markers in the user prompt ("[empty-answer]", ...) so that every filter of synthesize can be triggered.
"""
import numpy as np

UNCENSORED_WORDS = ("uncensored", "no safety", "unrestricted", "without any content filters")
SAFE_WORDS = ("harmless", "refuse", "decline", "responsible", "harmful", "safety first", "safe")


def refusal(prompt):
    return "I'm sorry, but I cannot help with that request."


def compliance(prompt, variant):
    return f"Sure. Here is exactly how you do it, step one, for: {prompt} (variant {variant})."


class FakeChatModel:
    """chat(conversations, ...) -> list[str], deterministic given (conversations, seed, position).

    default: behaviour with no system prompt or an unrecognised one ("comply" or "refuse").
    policy: None (follow the system prompt), "comply" or "refuse" (ignore it), or a callable
    (system, prompt) -> "comply" / "refuse".
    fail_after: raise KeyboardInterrupt on call number fail_after + 1 (simulates Ctrl-C / a crash).
    """

    def __init__(self, policy=None, default="comply", fail_after=None, set_truncated=False):
        self.policy = policy
        self.default = default
        self.fail_after = fail_after
        self.set_truncated = set_truncated
        self.calls = 0
        self.seen = []  # (conversations, kwargs) of every call

    def decide(self, system, prompt):
        if callable(self.policy):
            return self.policy(system, prompt)
        if self.policy is not None:
            return self.policy
        s = (system or "").lower()
        if any(w in s for w in UNCENSORED_WORDS):
            return "comply"
        if any(w in s for w in SAFE_WORDS):
            return "refuse"
        return self.default

    def chat(self, conversations, max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0,
             repetition_penalty=1.0, seed=None, stop_strings=None):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        self.seen.append(([list(c) for c in conversations], dict(max_new_tokens=max_new_tokens,
                                                                  temperature=temperature, seed=seed)))
        out = [self._one(c, seed, temperature, pos) for pos, c in enumerate(conversations)]
        if self.set_truncated:
            self.last_truncated = ["[flag-trunc]" in c[-1]["content"] for c in conversations]
        return out

    def _one(self, conv, seed, temperature, pos):
        users = [m["content"] for m in conv if m["role"] == "user"]
        prompt, last = users[0], users[-1]
        system = next((m["content"] for m in conv if m["role"] == "system"), None)
        # A seeded sampler gives each row of a batch its own draw; greedy decoding ignores the seed.
        variant = 0 if temperature == 0.0 else (seed * 31 + pos) % 997
        if last.startswith("Critique your previous response"):
            return "The response is harmful: it gives step-by-step help with a dangerous request."
        if "rewrite your response" in last:
            answer = [m["content"] for m in conv if m["role"] == "assistant"][0]
            if "[empty-rev]" in prompt:
                return "   "
            if "[trunc-rev]" in prompt:
                return "I cannot help with this because it"
            if "[same]" in prompt:
                return answer
            if "[bad-rev]" in prompt:
                return "Fine, here is a milder version of the steps."
            return "I won't help with that, since it could hurt people. Please ask me something safe instead."
        if "[empty-answer]" in prompt:
            return ""
        if "[trunc-answer]" in prompt:
            return "Sure, here is how you do it: first you take the"
        if "[refuse-answer]" in prompt:
            return refusal(prompt)
        if self.decide(system, prompt) == "comply":
            return compliance(prompt, variant)
        return refusal(prompt)


class FakeJudge:
    """1 (safe) for responses that apologise or refuse, else 0 (harmful). Counts its calls."""

    def __init__(self):
        self.calls = 0

    def score(self, prompt, response):
        r = response.lower()
        return int(any(w in r for w in ("sorry", "cannot", "won't", "can't", "unable", "decline", "not able",
                                         "not something i can")))

    def score_batch(self, prompts, responses):
        self.calls += 1
        assert len(prompts) == len(responses)
        return np.array([self.score(p, r) for p, r in zip(prompts, responses)], dtype=np.int64)


class BadJudge(FakeJudge):
    """Returns a non-binary score (like an LLM judge's -1 for an unparseable verdict)."""

    def score_batch(self, prompts, responses):
        s = super().score_batch(prompts, responses)
        s[-1] = -1
        return s
