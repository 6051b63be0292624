//! Genuine candle networks (GPT-2 and the Llama family) with HF weight names and layouts.
