"""Batch inference the Ray way: a Ray Data processor over rayinfer engines and EP gangs, and the OpenAI
batch-file runner behind `rayinfer run-batch`.

    from rayinfer.data import ProcessorConfig, build_processor
    processor = build_processor(ProcessorConfig(model="tiny", ep_size=2, concurrency=1, batch_size=32),
                                preprocess=lambda row: {"messages": [{"role": "user", "content": row["q"]}],
                                                        "sampling_params": {"temperature": 0, "max_tokens": 64}},
                                postprocess=lambda row: {"q": ..., "answer": row["generated_text"]})
    ds = processor(ray.data.read_json("questions.jsonl"))

Needs `ray[data]` (the `data` extra); everything here imports without it and says so when it is used.
"""
from rayinfer.data.config import ProcessorConfig
from rayinfer.data.processor import Processor, build_processor

__all__ = ["ProcessorConfig", "Processor", "build_processor"]
