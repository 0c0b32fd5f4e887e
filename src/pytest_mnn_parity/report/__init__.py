"""What a reviewer reads: JSON records, the terminal matrix, HTML, pictures, the diff of two reports."""
