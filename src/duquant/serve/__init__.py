"""openpi-compatible policy serving: the msgpack-numpy wire format (`wire`, torch-free), the LIBERO / generic
policy wrappers with openpi's transforms (`policy`), and the WebSocket server (`server`). `duquant serve` is
in `cli`."""
