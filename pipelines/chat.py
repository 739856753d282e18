"""Terminal chat with a finished run's model, its reply written token by token as it is generated.

    python -m pipelines.chat                          # the newest finished run under --root: its fine-tuned model
    python -m pipelines.chat --run-id ID | --experiment NAME [--branch lora|pretrain] | --model-dir DIR
        [--root DIR] [--system TEXT] [--temperature 0.7] [--top-p 0.95] [--top-k 0]
        [--max-new-tokens N] [--seed S] [--mode auto|chat|completion]

A model fine-tuned on conversations gets the conversation through its tokenizer's chat template
(mode `chat`); a pretrained model continues the text typed so far (mode `completion`), the way it
learned. `--mode auto` decides by the run's task (a chat task), or for a --model-dir by whether its
tokenizer has a chat template. The conversation stays within the model's context: the oldest
exchanges go first, then the start of the prompt. Ctrl-C stops the reply being written and keeps the
session; /reset starts over; Ctrl-D or /exit ends it. pipelines/serving_models.py says which models a run offers.
"""
from __future__ import annotations

import argparse
import sys

from pipelines import serving_models
from tasks.common import UserError
from tasks.generation import (Decoder, LoadedModel, Sampling, TextStream, fit_conversation, load_models,
                              text_prompt)

MODES = ("auto", "chat", "completion")
RESET, EXIT = "/reset", "/exit"


class Session:
    """One conversation with one model: its history, how it is prompted and sampled."""

    def __init__(self, model: LoadedModel, args: argparse.Namespace, out=sys.stdout):
        self.model, self.args, self.out = model, args, out
        self.chat = model.chat if args.mode == "auto" else args.mode == "chat"
        if self.chat and not model.tokenizer.chat_template:
            raise UserError(f"--mode chat: the tokenizer of {model.spec.id} has no chat template; use --mode completion")
        self.max_new_tokens = args.max_new_tokens or model.default_max_new_tokens
        if self.max_new_tokens >= model.context:
            raise UserError(f"--max-new-tokens {self.max_new_tokens} leaves no room for a prompt in the context of "
                            f"{model.spec.id} ({model.context} tokens); give at most {model.context - 1}")
        self.turns = 0
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.args.system}] if self.args.system and self.chat else []
        self.transcript = ""

    def prompt_ids(self, user_text: str) -> list[int]:
        """The prompt for the next reply, the conversation cut from its start to leave room for it."""
        room = self.model.context - self.max_new_tokens
        if self.chat:
            self.messages.append({"role": "user", "content": user_text})
            self.messages, ids = fit_conversation(self.model.tokenizer, self.messages, room)
            return ids
        self.transcript += ("\n" if self.transcript else "") + user_text
        return text_prompt(self.model.tokenizer, self.transcript)[-room:]

    def reply(self, user_text: str) -> str:
        """Generate and print the reply as it comes; Ctrl-C ends it early (what was written stays)."""
        sampling = Sampling(self.max_new_tokens, self.args.temperature, self.args.top_p, self.args.top_k,
                            None if self.args.seed is None else self.args.seed + self.turns)
        self.turns += 1
        tokenizer = self.model.tokenizer
        stream, text = TextStream(tokenizer), ""
        try:
            decoder = Decoder([self.prompt_ids(user_text)], [sampling], self.model.stop_ids, tokenizer.pad_token_id)
            while not decoder.done:
                with self.model.selected() as module:
                    token, _ = decoder.step(module)[0]
                text += self.write(stream.add(token))
            text += self.write(stream.flush())
        except KeyboardInterrupt:
            text += self.write(stream.flush())
            self.write(" [interrupted]")
        self.write("\n")
        if self.chat:
            self.messages.append({"role": "assistant", "content": text})
        else:
            self.transcript += text
        return text

    def write(self, text: str) -> str:
        self.out.write(text)
        self.out.flush()
        return text


def converse(session: Session, read=input) -> None:
    """Read a line, answer it, until end of input or /exit; Ctrl-C at the prompt does not end the session."""
    while True:
        try:
            line = read("you> ")
        except EOFError:
            session.write("\n")
            return
        except KeyboardInterrupt:
            session.write("\n(Ctrl-D or /exit ends the session)\n")
            continue
        if line.strip() == EXIT:
            return
        if line.strip() == RESET:
            session.reset()
            session.write("(conversation reset)\n")
        elif line.strip():
            session.write("model> ")
            session.reply(line)


def check_sampling(args: argparse.Namespace) -> None:
    if args.temperature < 0:
        raise UserError(f"--temperature {args.temperature}: give 0 (greedy) or more")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p {args.top_p}: give a value in (0, 1]")
    if args.top_k < 0:
        raise UserError(f"--top-k {args.top_k}: give 0 (off) or more")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: give 1 or more")


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(prog="python -m pipelines.chat", description=__doc__.split("\n\n")[0])
    serving_models.add_selection_arguments(parse)
    parse.add_argument("--branch", help="a fine-tuned branch of the run (`finetunes:` of its experiment), or pretrain")
    parse.add_argument("--mode", choices=MODES, default="auto", help="chat template or plain text continuation")
    parse.add_argument("--system", default="", help="a system message at the start of the conversation (chat mode)")
    parse.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    parse.add_argument("--top-p", type=float, default=0.95)
    parse.add_argument("--top-k", type=int, default=0, help="0: off")
    parse.add_argument("--max-new-tokens", type=int, default=None,
                       help="most tokens per reply (default: the model's generation_config)")
    parse.add_argument("--seed", type=int, default=None, help="sampling seed (reply n uses seed + n)")
    return parse


def main(argv: list[str] | None = None, read=input) -> int:
    args = parser().parse_args(argv)
    try:
        check_sampling(args)
        summary, specs, skipped, source = serving_models.selected_models(args)
        spec = specs[0] if summary is None else serving_models.pick_branch(specs, skipped, args.branch, summary)
        spec = serving_models.fetched([spec], source, say=lambda line: print(line, file=sys.stderr))[0]
        model = load_models([spec])[spec.id]
        session = Session(model, args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    origin = f"run {summary['run_id']} ({summary.get('experiment', '?')}), " if summary else ""
    print(f"{spec.id}: {origin}{spec.path}\n{'chat' if session.chat else 'completion'} mode, context "
          f"{model.context} tokens, up to {session.max_new_tokens} per reply; Ctrl-C stops a reply, "
          f"/reset starts over, Ctrl-D or /exit ends", file=sys.stderr)
    converse(session, read)
    return 0


if __name__ == "__main__":
    sys.exit(main())
