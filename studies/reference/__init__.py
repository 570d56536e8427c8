"""Other quantization methods the studies compare bitsearch with: adapters for peer packages
(``peers``: HQQ, AutoRound, AutoScheme), a reference GPTQ on bitsearch's grid (``gptq``) and
llama.cpp's per-tensor rule mixes as plans (``llamacpp_mixes``)."""
