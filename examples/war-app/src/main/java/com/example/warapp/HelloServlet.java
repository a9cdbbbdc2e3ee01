package com.example.warapp;

import jakarta.servlet.annotation.WebServlet;
import jakarta.servlet.http.HttpServlet;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import java.io.IOException;

/** Answers every path with the release's version: what the release's health check reads. */
@WebServlet("/")
public class HelloServlet extends HttpServlet {
    private final String version = Release.load().getProperty("version");

    @Override
    protected void doGet(HttpServletRequest req, HttpServletResponse resp) throws IOException {
        resp.setContentType("text/plain");
        resp.getWriter().println("war-app " + version);
    }
}
