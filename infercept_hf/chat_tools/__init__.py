"""Real models' tool calls: Python functions as tools, parsed and answered through the chat template.

`functions` describes a function as a tool, `format` reads calls with the tokenizer's response
template and renders results with its chat template, `session` pauses a request on a turn's
calls and answers them, `conversations` runs whole chats (`infercept_hf.chat`).
"""
from .conversations import chat
from .format import ChatFormat, ChatTemplateError, ParsedCall, ParsedTurn
from .functions import FunctionTool, current_call, function_tool, split_tools
from .session import CallRecord, ChatPending, ChatSession

__all__ = [
    "CallRecord",
    "ChatFormat",
    "ChatPending",
    "ChatSession",
    "ChatTemplateError",
    "FunctionTool",
    "ParsedCall",
    "ParsedTurn",
    "chat",
    "current_call",
    "function_tool",
    "split_tools",
]
