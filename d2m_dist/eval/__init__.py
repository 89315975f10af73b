"""Quality measures: the digits classifier score of generated images."""
