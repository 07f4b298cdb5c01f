"""Gradio demo: chat with a tool-calling model and watch INFERCEPT decide where paused KV waits.

    python demos/app.py [--port 7860] [--host 127.0.0.1] [--model bundled|ID|PATH] [--policy min-waste]

Three panels: the chat (each tool call shown as it happens, with the strategy the engine
chose for that pause and the waste figures behind it), the live KV memory of the one engine
every chat shares, and a load test that replays a benchmark trace under each policy.
docs/DEMO.md has a tour.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import infercept_hf as ih  # noqa: E402
from infercept_hf.bench.plots import policy_colors_hex  # noqa: E402
import load_test as loadtest  # noqa: E402
from chat_session import (  # noqa: E402
    BUNDLED,
    DEFAULT_NUM_BLOCKS,
    ChatSession,
    LoadedModel,
    ModelLoadError,
    load_model,
    ticking,
)
from panels import MemoryMonitor, figures_markdown  # noqa: E402
from transcript import Turn  # noqa: E402

log = logging.getLogger("infercept_demo")

EMPTY_MESSAGE = "The message is empty: type a question first."
EXAMPLES = ["What is 123 * 45?", "Compute 9876-1234", "What is the capital of France?", "Draw a red cat on the moon.",
            "Read this aloud: the train is late", "I want to book a trip.", "Fetch the lamp."]
TICK_S = 0.25  # redraw a silent chat (a long tool pause) this often
STREAM_EVERY_S = 0.1  # tokens are batched into redraws this far apart
POLICY_HEX = policy_colors_hex()
BAR_HEADROOM = 1.15  # a bar chart's axis ends this far above its tallest bar
CHAT_CONCURRENCY = 16  # chats streaming at once: they share one engine, which batches them
INTRO = """# INFERCEPT on transformers: tool calls pause requests, the engine decides where their KV waits
Each tool call below shows the call, the answer spliced into the context, how long the tool took, and whether
the paused context's KV was **preserved** on the device, **swapped** to host memory or **discarded** (to be
recomputed), with the waste figures (bytes × seconds) the policy compared. Every tab shares one engine."""


def _chart(y: str, title: str, y_title: str) -> gr.LinePlot:
    return gr.LinePlot(x="t", y=y, color="series", title=title, x_title="seconds since start", y_title=y_title,
                       y_axis_format="d", height=230)


def build_app(model: Any, tokenizer: Any, tools: list[ih.Tool], policy: str = "min-waste", *,
              name: str = BUNDLED, num_blocks: int = DEFAULT_NUM_BLOCKS,
              cost_model: ih.CostModel | None = None) -> gr.Blocks:
    """The demo, not launched. `name` is what the UI calls the model. A model trained on the demo's
    format gets its questions as it was trained, any other through its chat template with the tools
    spelled out. Call `app.shutdown()` when done: it stops the engine's driver and the memory sampler."""
    session = ChatSession(LoadedModel(name, model, tokenizer, tools), policy, num_blocks, cost_model)
    monitor = MemoryMonitor(lambda: session.engine)

    async def chat(message: str, history: list[dict]) -> AsyncIterator[tuple[list[dict], str, Any]]:
        """Streams (chat, notice, message box); the box is cleared once, so typing meanwhile is kept."""
        question = (message or "").strip()
        if not question:
            yield history, EMPTY_MESSAGE, gr.skip()
            return
        engine, loaded = session.engine, session.loaded
        turn = Turn(loaded.tokenizer, loaded.tools, session.policy)
        shown = [*history, {"role": "user", "content": question}]
        yield shown + turn.messages(), "", ""
        last = time.monotonic()
        try:
            async for event in ticking(session.ask(question), TICK_S):
                if event is not None:
                    turn.apply(event)
                if turn.open_step is not None:  # placements take the engine's step lock: only when it can matter
                    turn.watch(engine.pause_placements())
                if event is None or event.kind != "token" or time.monotonic() - last >= STREAM_EVERY_S:
                    last = time.monotonic()
                    yield shown + turn.messages(), "", gr.skip()
        except (ValueError, ModelLoadError) as exc:  # refused by the engine: too long, bad input
            yield shown + turn.messages(), f"Error: {exc}", gr.skip()
            return
        except Exception as exc:  # noqa: BLE001 - the UI shows a message, the log keeps the trace
            log.exception("chat request failed")
            yield shown + turn.messages(), f"Error: the engine failed on this request ({type(exc).__name__}: {exc}); " \
                "reload the model under *Model and policy*.", gr.skip()
            return
        yield shown + turn.messages(), "", gr.skip()

    def configure(spec: str, new_policy: str) -> tuple[str, str]:
        spec = (spec or "").strip() or BUNDLED
        try:
            loaded = session.loaded if spec == session.loaded.name else load_model(spec)
            session.configure(loaded, new_policy)
        except ModelLoadError as exc:
            return f"Error: {exc}", session.loaded.name
        except ih.UnsupportedModelError as exc:
            return f"Error: the engine cannot serve `{spec}`: {exc}", session.loaded.name
        except Exception as exc:  # noqa: BLE001 - the UI shows a message, the log keeps the trace
            log.exception("switching to %s failed", spec)
            return f"Error: could not switch to `{spec}`: {type(exc).__name__}: {exc}", session.loaded.name
        return f"Serving **{session.loaded.name}** under policy **{session.policy}**.", session.loaded.name

    def memory() -> tuple[pd.DataFrame, pd.DataFrame, str]:
        engine = session.engine
        return (monitor.block_frame(engine), monitor.token_frame(),
                figures_markdown(engine.stats(), session.policy, session.loaded.name))

    def run_load_test(users: float, rate: float, mix: str, policies: list[str],
                      hardware: str) -> Iterator[tuple[str, pd.DataFrame, pd.DataFrame, pd.DataFrame]]:
        test = loadtest.LoadTest(users=int(users), rate=float(rate or 0), mix=mix,
                                 policies=loadtest.parse_policies(policies or []), hardware=hardware)
        rows: list[dict] = []
        try:
            test.check()
            yield f"Running {len(test.policies)} policies on {test.users} users…", *_load_frames(rows)
            for row in loadtest.run(test, session.loaded.model, session.engine.cost):
                rows.append(row)
                yield f"Ran {len(rows)} of {len(test.policies)} policies…", *_load_frames(rows)
        except ValueError as exc:
            yield f"Error: {exc}", *_load_frames(rows)
            return
        except Exception as exc:  # noqa: BLE001 - the UI shows a message, the log keeps the trace
            log.exception("load test failed")
            yield f"Error: the load test failed ({type(exc).__name__}: {exc}).", *_load_frames(rows)
            return
        yield f"Done: {test.users} users on `{test.mix}`, {test.hardware}: every policy replayed the same trace.", \
            *_load_frames(rows)

    with gr.Blocks(title="INFERCEPT demo") as app:
        gr.Markdown(INTRO)
        with gr.Tab("Chat"):
            with gr.Row():
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(label="chat", height=520, elem_id="chat", buttons=["copy_all"],
                                         feedback_options=None)
                    with gr.Row():
                        box = gr.Textbox(placeholder="Ask something, e.g. What is 123 * 45?", show_label=False,
                                         scale=5, elem_id="message", submit_btn=False)
                        send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                    notice = gr.Markdown(elem_id="notice")
                    gr.Examples(EXAMPLES, inputs=box, label="try")
                with gr.Column(scale=2):
                    gr.Markdown("### KV memory of the shared engine (live)")
                    blocks_plot = _chart("blocks", "KV blocks", "blocks")
                    tokens_plot = _chart("tokens", "Discarded and recomputed context", "tokens")
                    figures = gr.Markdown(elem_id="figures")
            with gr.Accordion("Model and policy", open=False):
                with gr.Row():
                    model_box = gr.Textbox(value=name, label="model: bundled, a transformers id, or a local path",
                                           scale=3)
                    policy_box = gr.Dropdown(list(ih.POLICIES), value=session.policy, label="policy", scale=1)
                    apply = gr.Button("Load", scale=1)
                model_notice = gr.Markdown(elem_id="model-notice")
        with gr.Tab("Load test"):
            gr.Markdown("N simulated users arrive on a benchmark workload mix; each policy replays the same trace "
                        "(`infercept_hf.bench`). On this machine tool pauses are 100× shorter and contexts 10× "
                        "shorter than the paper's; a simulator preset replays them at full scale on a virtual clock.")
            with gr.Row():
                users = gr.Slider(1, 64, value=loadtest.LoadTest.users, step=1, label="users")
                rate = gr.Number(value=loadtest.LoadTest.rate, label="arrivals per second", minimum=0.01)
                mix = gr.Dropdown(list(loadtest.MIXES), value=loadtest.MIX, label="workload")
                hardware = gr.Dropdown(list(loadtest.HARDWARE), value=loadtest.REAL, label="hardware")
            policies = gr.CheckboxGroup(list(ih.POLICIES), value=list(loadtest.DEFAULT_POLICIES), label="policies")
            start = gr.Button("Run load test", variant="primary")
            load_notice = gr.Markdown()
            table = gr.Dataframe(headers=list(loadtest.COLUMNS), interactive=False, label="per policy", wrap=True)
            with gr.Row():
                # one colour per policy, the benchmark's figures' own (bench.plots.POLICY_COLORS)
                colours = dict(color="policy", color_map=POLICY_HEX, sort=list(ih.POLICIES), y_lim=[0, None],
                               height=260)
                rps_plot = gr.BarPlot(x="policy", y="value", title="completed requests/s (higher is better)",
                                      y_title="req/s", **colours)
                latency_plot = gr.BarPlot(x="policy", y="value", title="normalized latency (lower is better)",
                                          y_title="ms/token", **colours)

        gr.on([send.click, box.submit], chat, [box, chatbot], [chatbot, notice, box], api_name="chat",
              concurrency_limit=CHAT_CONCURRENCY)
        apply.click(configure, [model_box, policy_box], [model_notice, model_box], api_name="load_model")
        gr.on([app.load, gr.Timer(0.5).tick], memory, None, [blocks_plot, tokens_plot, figures], api_name="memory",
              show_progress="hidden")
        start.click(run_load_test, [users, rate, mix, policies, hardware],
                    [load_notice, table, rps_plot, latency_plot], api_name="load_test")

    def shutdown() -> None:
        monitor.close()
        session.close()

    app.shutdown = shutdown
    return app


def _load_frames(rows: list[dict]) -> tuple[pd.DataFrame, gr.BarPlot, gr.BarPlot]:
    table = pd.DataFrame(rows, columns=list(loadtest.COLUMNS))

    def bars(column: str) -> gr.BarPlot:  # typed even when empty: the chart keeps its first axis types
        frame = pd.DataFrame({"policy": table["policy"], "value": table[column]}).dropna().astype({"value": float})
        top = float(frame["value"].max()) if len(frame) else 0.0
        # headroom above the tallest bar, so that no bar touches the frame
        return gr.BarPlot(value=frame, y_lim=[0, top * BAR_HEADROOM if top > 0 else None])

    return table, bars(loadtest.RPS_COLUMN), bars(loadtest.LATENCY_COLUMN)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=BUNDLED, help="bundled (default), a transformers model id, or a local path")
    parser.add_argument("--policy", default="min-waste", choices=ih.POLICIES)
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 to share on a network)")
    parser.add_argument("--num-blocks", type=int, default=DEFAULT_NUM_BLOCKS,
                        help="device KV blocks of 16 tokens: small, so concurrent chats compete for memory")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: a small model gains nothing from more, a busy machine "
                             "loses a lot)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    try:
        loaded = load_model(args.model)
        app = build_app(loaded.model, loaded.tokenizer, loaded.tools, args.policy, name=loaded.name,
                        num_blocks=args.num_blocks)
    except (ModelLoadError, ih.UnsupportedModelError, ValueError) as exc:  # ValueError: engine sizes
        sys.exit(f"error: {exc}")
    try:
        app.launch(server_name=args.host, server_port=args.port, theme=gr.themes.Soft())
    finally:
        app.shutdown()


if __name__ == "__main__":
    main()
