"""The bundled demo: a tiny tool-calling Llama, its six tools, and a plain reference tool loop.

    model, tokenizer, tools = demo_model(image_seconds=0.0, tts_seconds=0.0)
    enc = tokenizer([demo_prompt("What is 123 * 45?")], return_tensors="pt")
    out = infercept_hf.generate(model, enc.input_ids, attention_mask=enc.attention_mask,
                                tokenizer=tokenizer, tools=tools, max_new_tokens=64)

Format, training and accuracy: docs/DEMO_MODEL.md.
"""
from .chat_format import demo_prompt
from .model import demo_model
from .reference_loop import Transcript, run_with_tools
from .tools import calculator, demo_functions, demo_tools

__all__ = ["Transcript", "calculator", "demo_functions", "demo_model", "demo_prompt", "demo_tools", "run_with_tools"]
