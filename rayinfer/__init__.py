"""rayinfer: serve DeepSeek-V3/R1-architecture MoE models on Ray, the way DeepSeek's production system does."""
__version__ = "0.1.0"
