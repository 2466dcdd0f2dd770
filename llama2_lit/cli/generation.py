"""``llama2-lit generate`` and ``llama2-lit chat``: sample from a checkpoint."""

from __future__ import annotations

import argparse
import json
import sys

from llama2_lit.cli.common import CommandError, add_checkpoint_arguments, load_model_and_tokenizer, new_parser, note


def _sampling_arguments(parser: argparse.ArgumentParser) -> None:
    from llama2_lit.config import DTYPES
    from llama2_lit.generation import DEFAULT_TEMPERATURE, DEFAULT_TOP_P

    add_checkpoint_arguments(parser)
    parser.add_argument("--system", default=None, help="system prompt (chat format)")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="most tokens generated per answer (capped by the context)")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="0 = greedy (%(default)s: Meta's, llama/generation.py)")
    parser.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help="nucleus mass (%(default)s: Meta's, llama/generation.py)")
    parser.add_argument("--seed", type=int, default=1, help="sampling seed (as Meta's examples)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="weights and KV cache (logits and sampling are fp32 regardless)")


def _load(args: argparse.Namespace):
    import torch

    if not 0 < args.top_p <= 1 or args.temperature < 0:
        raise CommandError(f"need --temperature >= 0 and 0 < --top-p <= 1, got {args.temperature}, {args.top_p}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_model_and_tokenizer(args.checkpoint, args.tokenizer, device=device, dtype=args.dtype)


def _continuation(tokenizer, prompt: list[int], tokens: list[int]) -> str:
    """The text that ``tokens`` add after ``prompt``. Decoding them alone would drop the space of a
    leading ``▁word`` piece (SentencePiece strips it at the start of a decode)."""
    prompt_text = tokenizer.decode(prompt)
    full_text = tokenizer.decode(prompt + tokens)
    return full_text[len(prompt_text):] if full_text.startswith(prompt_text) else tokenizer.decode(tokens)


def generate_main(argv: list[str] | None = None) -> int:
    """Sample completions from a checkpoint.

    Plain prompts are encoded as Meta's text_completion does (BOS, no EOS; llama/generation.py) and
    printed followed by their continuation; --chat makes each prompt one user turn (chat_completion;
    with --system) and prints the answer. --json prints one JSON object per prompt instead.
    """
    parser = new_parser("generate", generate_main.__doc__)
    _sampling_arguments(parser)
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    parser.add_argument("--chat", action="store_true", help="prompts are user turns in Llama 2's chat format")
    parser.add_argument("--json", action="store_true", help="print JSON lines: prompt, completion, tokens, logprobs, eos")
    args = parser.parse_args(argv)
    if args.system is not None and not args.chat:
        parser.error("--system needs --chat")

    from llama2_lit.chat import encode_prompt
    from llama2_lit.generation import generate

    model, tokenizer = _load(args)
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system is not None else []
        prompts = [encode_prompt(tokenizer, system + [{"role": "user", "content": p}]) for p in args.prompt]
    else:
        prompts = [tokenizer.encode(p, bos=True, eos=False) for p in args.prompt]
    room = model.config.max_seq_len - max(map(len, prompts))
    if room < 1:
        raise CommandError(f"a prompt of {max(map(len, prompts))} tokens fills the context of "
                           f"{model.config.max_seq_len} tokens; shorten it")
    if args.max_new_tokens > room:
        note(f"--max-new-tokens {args.max_new_tokens} capped at {room} by the context")
    out = generate(model, prompts, max_new_tokens=min(args.max_new_tokens, room), temperature=args.temperature,
                   top_p=args.top_p, eos_id=tokenizer.eos_id, generator=args.seed)
    for row, (text, tokens) in enumerate(zip(args.prompt, out.response_tokens())):
        completion = tokenizer.decode(tokens) if args.chat else _continuation(tokenizer, prompts[row], tokens)
        if args.json:
            length = int(out.response_lengths[row])
            print(json.dumps({"prompt": text, "completion": completion, "tokens": tokens,
                              "logprobs": [round(x, 6) for x in out.logprobs[row, :length].tolist()],
                              "eos": bool(out.eos_emitted[row])}, ensure_ascii=False))
        else:
            if row:
                print("\n" + "-" * 40)
            print(completion if args.chat else text + completion)
    return 0


def chat_main(argv: list[str] | None = None) -> int:
    """Chat with a checkpoint in the Llama 2 chat format, on stdin and stdout.

    Each line read is a user turn; each answer is printed on stdout followed by a newline, and
    nothing else goes to stdout (prompts and notes go to stderr), so piped input gives exactly the
    answers. /reset starts a new dialog, /exit or end of input quits. When the dialog outgrows the
    context, its earliest exchanges are dropped (the system prompt is kept), as
    llama2_lit.chat.encode_prompt does.
    """
    parser = new_parser("chat", chat_main.__doc__)
    _sampling_arguments(parser)
    args = parser.parse_args(argv)

    import torch

    from llama2_lit.chat import ChatFormatError, encode_prompt
    from llama2_lit.generation import generate

    model, tokenizer = _load(args)
    context = model.config.max_seq_len
    # Earliest exchanges are dropped to leave the answer this much room (at most half the context).
    answer_room = max(1, min(args.max_new_tokens, context // 2))
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    generator = torch.Generator().manual_seed(args.seed)  # one stream for the session: fresh samples each turn
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chat with the model. /reset starts a new dialog, /exit (or Ctrl-D) quits.", file=sys.stderr)
    dialog: list[dict[str, str]] = []
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        user = line.strip()
        if not user:
            continue
        if user == "/exit":
            break
        if user == "/reset":
            dialog = []
            print("(new dialog)", file=sys.stderr)
            continue
        messages = system + dialog + [{"role": "user", "content": user}]
        try:
            prompt = encode_prompt(tokenizer, messages, max_len=context - answer_room)
        except ChatFormatError as error:  # special tags in the text, or a turn longer than the context
            print(f"error: {error}", file=sys.stderr)  # this turn only: the session goes on
            continue
        max_new_tokens = min(args.max_new_tokens, context - len(prompt))
        out = generate(model, [prompt], max_new_tokens=max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, eos_id=tokenizer.eos_id, generator=generator)
        answer = tokenizer.decode(out.response_tokens()[0])
        print(answer, flush=True)
        if not bool(out.eos_emitted[0]):
            print(f"(answer cut at {max_new_tokens} tokens)", file=sys.stderr)
        dialog += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return 0
