"""The review inbox (ReviewItem) lands here; see issue #6."""
