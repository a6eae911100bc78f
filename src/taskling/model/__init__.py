"""The model stage: base models, their tokenizers and the chat format every later stage uses.

`model` owns resolving a base model spec (a Hugging Face id, a local folder, a `.gguf`
file or a bundled alias) and loading it (`loader`), the chat format that turns a text into
prompt token ids and a label into answer ids with the user's text kept as plain text
(`loader.ChatFormat`, `loader.PromptTemplate`), chat templates for models that ship none
(`chat_templates`), base-model presets (`presets`), the bundled models' install commands
(`bundled`) and MiniLM sentence embeddings (`embed`). It may import only
`taskling.errors`, `io`, `task`, `config` and `rundir`; every stage above may import it.
"""
