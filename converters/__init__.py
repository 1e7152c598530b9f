"""Weight-format converters: one module per source format, each mapping names onto the runtime's."""
