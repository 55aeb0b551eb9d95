"""One module per endpoint clients call: parsing, validation and the OpenAI/Anthropic wire shapes.
"""
