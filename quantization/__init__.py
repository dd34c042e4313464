"""Weight/activation quantization schemes and llama.cpp block formats. Empty until its issue lands."""
