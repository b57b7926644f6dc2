"""The bottom layer every other part imports: the one bad-input exception and the one JSON conversion."""
